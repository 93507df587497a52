"""launchers.etcd_retry: the etcd-v2 rendezvous backend that retries transient RendezvousConnectionErrors, against an
in-memory compare-and-swap store with injected failures (a lost response, a late commit, another writer), and torch's
own EtcdRendezvousBackend over a fake etcd client raising python-etcd's exceptions."""

import itertools

import etcd
import pytest
import urllib3.exceptions
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousConnectionError
from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend

from launchers import etcd_retry
from launchers.etcd_retry import RetryingBackend, is_transient


def connection_error(cause=None):
    try:
        raise RendezvousConnectionError("The connection to etcd has failed.") from cause
    except RendezvousConnectionError as e:
        return e


class Clock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


class CasStore:
    """A RendezvousBackend over one key: get_state -> (bytes, token) or None; set_state is a compare-and-swap on the
    token (None: create). `fail` holds per-call plans: "raise" (nothing happens), "lost" (the write lands, the
    response is lost), "late" (not landed now; lands just before the next call)."""

    name = "etcd-v2"

    def __init__(self, fail=()):
        self.value, self.token, self.fail, self.calls, self.late = None, 0, list(fail), [], None
        self.tokens = itertools.count(10)

    def _plan(self, what):
        self.calls.append(what)
        if self.late is not None and what == "set":
            self._write(self.late)
            self.late = None
        return self.fail.pop(0) if self.fail else None

    def _write(self, state):
        self.value, self.token = state, next(self.tokens)

    def get_state(self):
        if self._plan("get") == "raise":
            raise connection_error(etcd.EtcdException("etcdserver: request timed out"))
        return None if self.value is None else (self.value, self.token)

    def set_state(self, state, token=None):
        plan = self._plan("set")
        if plan == "raise":
            raise connection_error(urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"))
        if plan == "late":
            self.late = state
            raise connection_error(etcd.EtcdException("etcdserver: request timed out"))
        if (token is None and self.value is not None) or (token is not None and token != self.token):
            return None if self.value is None else (self.value, self.token, False)  # as torch's after a conflict
        self._write(state)
        if plan == "lost":
            raise connection_error(etcd.EtcdConnectionFailed("connection reset"))
        return self.value, self.token, True


def wrapped(store, budget=60.0):
    clock = Clock()
    return RetryingBackend(store, budget, sleep=clock.sleep, clock=clock), clock


def test_get_state_retried_until_it_answers_with_backoff(capsys):
    store = CasStore(fail=["raise"] * 5)
    store.value, store.token = b"s", 3
    backend, clock = wrapped(store)
    assert backend.get_state() == (b"s", 3) and store.calls == ["get"] * 6
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 5.0]  # doubling, capped at 5 s
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5 and all(
        "get_state failed (EtcdException: etcdserver: request timed out)" in x for x in lines
    )


def test_set_state_raised_before_landing_is_written_once():
    store = CasStore(fail=["raise", "raise"])
    store.value, store.token = b"old", 3
    backend, _ = wrapped(store)
    assert backend.set_state(b"new", 3) == (b"new", 10, True)
    assert store.calls == ["set", "get", "get", "set"]  # read back (failed once; the old token): the same CAS again


def test_set_state_whose_response_was_lost_is_read_back_not_rewritten():
    store = CasStore(fail=["lost"])
    store.value, store.token = b"old", 3
    backend, _ = wrapped(store)
    assert backend.set_state(b"new", 3) == (b"new", 10, True)
    assert store.calls == ["set", "get"] and store.token == 10  # landed once, no second write


def test_creating_set_state_whose_response_was_lost():
    store = CasStore(fail=["lost"])
    backend, _ = wrapped(store)
    assert backend.set_state(b"first", None) == (b"first", 10, True) and store.calls == ["set", "get"]


def test_a_lost_write_committed_late_is_reported_landed():
    """etcd commits the timed-out write after the read back saw the old token: the retried CAS loses the compare
    against our own bytes."""
    store = CasStore(fail=["late"])
    store.value, store.token = b"old", 3
    backend, _ = wrapped(store)
    assert backend.set_state(b"new", 3) == (b"new", 10, True)
    assert store.calls == ["set", "get", "set"] and store.token == 10


def test_another_writer_after_a_lost_response_is_a_conflict():
    store = CasStore(fail=["raise"])
    store.value, store.token = b"old", 3
    backend, _ = wrapped(store)
    real_get = store.get_state

    def other_node_wrote_first():
        store.value, store.token = b"theirs", 42
        store.get_state = real_get
        return real_get()

    store.get_state = other_node_wrote_first
    assert backend.set_state(b"new", 3) == (b"theirs", 42, False) and store.value == b"theirs"


def test_a_conflict_is_not_retried():
    store = CasStore()
    store.value, store.token = b"theirs", 7
    backend, clock = wrapped(store)
    assert backend.set_state(b"new", 3) == (b"theirs", 7, False) and store.calls == ["set"] and clock.sleeps == []


@pytest.mark.parametrize(
    "exc",
    [
        RendezvousClosedError(),
        connection_error(etcd.EtcdInsufficientPermissions("denied")),
        connection_error(etcd.EtcdNotDir("not a dir")),
        connection_error(etcd.EtcdValueError("bad value")),
        ValueError("x"),
    ],
)
def test_non_transient_errors_pass_through_at_once(exc):
    class Raises(CasStore):
        def get_state(self):
            self.calls.append("get")
            raise exc

    store = Raises()
    backend, clock = wrapped(store)
    with pytest.raises(type(exc)) as info:
        backend.get_state()
    assert info.value is exc and store.calls == ["get"] and clock.sleeps == []


def test_transient_kinds():
    assert is_transient(connection_error())
    assert is_transient(connection_error(etcd.EtcdException("etcdserver: request timed out")))
    assert is_transient(connection_error(etcd.EtcdLeaderElectionInProgress("election")))
    assert is_transient(connection_error(etcd.EtcdWatchTimedOut("watch")))
    assert is_transient(connection_error(urllib3.exceptions.ConnectTimeoutError("connect")))
    assert not is_transient(connection_error(etcd.EtcdKeyNotFound("gone")))
    assert not is_transient(RendezvousClosedError())


def test_gives_up_after_the_budget(capsys):
    store = CasStore(fail=["raise"] * 100)
    store.value = b"s"
    backend, clock = wrapped(store, budget=20.0)
    with pytest.raises(RendezvousConnectionError):
        backend.get_state()
    assert sum(clock.sleeps) <= 20.0 and clock.sleeps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert "get_state failed 7 times: giving up" in capsys.readouterr().err


class FakeEtcdClient:
    """python-etcd's Client as torch's backend uses it: read, and write with prevIndex/prevExist."""

    def __init__(self, fail):
        self.fail, self.node, self.index = list(fail), None, 5

    def _result(self):
        return etcd.EtcdResult(node={"key": "k", "value": self.node[0], "modifiedIndex": self.node[1]})

    def read(self, key):
        if self.fail and self.fail[0] == "read":
            self.fail.pop(0)
            raise etcd.EtcdException("etcdserver: request timed out")
        if self.node is None:
            raise etcd.EtcdKeyNotFound("not found")
        return self._result()

    def write(self, key, value, ttl, prevIndex=None, prevExist=None):
        plan = self.fail.pop(0) if self.fail and self.fail[0] in ("write", "lost") else None
        if plan == "write":
            raise etcd.EtcdException("etcdserver: request timed out")
        if prevExist is False and self.node is not None:
            raise etcd.EtcdAlreadyExist("exists")
        if prevIndex is not None and (self.node is None or self.node[1] != prevIndex):
            raise etcd.EtcdCompareFailed("compare failed")
        self.index += 1
        self.node = (value, self.index)
        if plan == "lost":
            raise urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")
        return self._result()


def test_torchs_etcd_v2_backend_over_a_failing_client():
    client = FakeEtcdClient(["write", "read", "lost", "lost"])
    backend, clock = wrapped(EtcdRendezvousBackend(client, "run1"))
    assert backend.name == etcd_retry.NAME
    # create: timed out; read back failed; no key: written again, its response lost; read back: ours
    assert backend.set_state(b"a", None) == (b"a", 6, True)
    assert backend.set_state(b"b", 6) == (b"b", 7, True)  # response lost: read back, written once
    assert client.index == 7 and len(clock.sleeps) == 4
    with pytest.raises(RendezvousConnectionError):  # the unwrapped backend raises at the first timeout
        EtcdRendezvousBackend(FakeEtcdClient(["read"]), "run1").get_state()


def test_main_registers_the_handler_and_points_etcd_v2_at_it(monkeypatch):
    from torch.distributed import run as torch_run

    seen = []
    monkeypatch.setattr(torch_run, "run", lambda args: seen.append(args.rdzv_backend))
    argv = ["--nnodes", "1:2", "--rdzv-backend", "etcd-v2", "--rdzv-endpoint", "127.0.0.1:1", "-m", "x"]
    etcd_retry.main(argv)
    etcd_retry.main([*argv[:3], "c10d", *argv[4:]])
    assert seen == [etcd_retry.NAME, "c10d"]
    params = RendezvousParameters(etcd_retry.NAME, "127.0.0.1:1", "run1", 1, 2, join_timeout="45")
    monkeypatch.setattr(etcd, "Client", lambda *a, **k: FakeEtcdClient([]))
    handler = rendezvous_handler_registry.create_handler(params)
    assert handler.get_backend() == etcd_retry.NAME and handler._state_holder._backend._budget_s == 45.0

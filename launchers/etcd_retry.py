"""python -m launchers.etcd_retry [torchrun options] ...: torchrun whose etcd-v2 rendezvous survives an etcd election.

launchers.torchrun starts its agent through this module. With `--rdzv-backend etcd-v2` the agent gets torch's own
etcd-v2 backend wrapped in RetryingBackend, registered through torch's public rendezvous_handler_registry under the
name "etcd-v2-retry" (the registry refuses to replace the "etcd-v2" entry), then torch.distributed.run runs as usual.

Why: when the host of the etcd raft leader dies, the other members elect a new leader within about a second, but a
rendezvous request sent to the old leader in that window is answered `etcdserver: request timed out` about 7 s later.
torch 2.14.1's backend raises RendezvousConnectionError and nothing retries it: the agent exits and the job ends.

What is retried: RendezvousConnectionError whose cause is transient (a timeout, a failed connection, a leader election,
or etcd's plain server error such as `request timed out`), with backoff from 0.5 s doubling to 5 s, one line on stderr
per retry, for at most the rendezvous's join timeout (`join_timeout` in --rdzv-conf, torch's default 600 s) since the
first failure: a node that cannot reach etcd that long would time out of the rendezvous anyway, and one election takes
seconds. Not retried: RendezvousClosedError, a compare-and-swap conflict (torch's backend answers it with the current
state, has_set False), an etcd answer about the key or value itself (EtcdKeyError, EtcdValueError), permissions.

set_state is a compare-and-swap on a token (etcd's modifiedIndex). When its response is lost the write may or may not
have landed (etcd may even commit it after the timeout). Before writing again the state is read back: our bytes there
-> it landed (has_set True); a different state under a different token (or under no token, when we created the key)
-> another node wrote (perhaps on top of ours): that state, has_set False, as after a CAS conflict; the token we had
(or no key, when creating) -> not landed: the same compare-and-swap again. A late commit of the lost write and the
retry cannot both land (the second fails the compare), and a retry answered with a conflict whose state is our bytes
is reported as landed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, create_handler

NAME = "etcd-v2-retry"
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 5.0
DEFAULT_BUDGET_S = 600.0  # torch's default join timeout


def transient_causes() -> tuple[type, ...]:
    try:
        import etcd
        import urllib3.exceptions
    except ImportError:
        return ()
    return (urllib3.exceptions.TimeoutError, etcd.EtcdConnectionFailed, etcd.EtcdLeaderElectionInProgress)


def is_transient(exc: BaseException) -> bool:
    """A RendezvousConnectionError worth retrying: no cause, or a timeout, connection failure, election or etcd's
    plain server error (`etcdserver: request timed out` is errorCode 300, python-etcd's bare EtcdException)."""
    if not isinstance(exc, RendezvousConnectionError):
        return False
    cause = exc.__cause__
    if cause is None or isinstance(cause, transient_causes()):
        return True
    try:
        import etcd
    except ImportError:
        return False
    return type(cause) is etcd.EtcdException


class RetryingBackend(RendezvousBackend):
    """`inner` (a RendezvousBackend) with transient RendezvousConnectionErrors retried, at most `budget_s` seconds
    after the first failure of a call; the error is raised when the next retry would start past that."""

    def __init__(
        self,
        inner: RendezvousBackend,
        budget_s: float = DEFAULT_BUDGET_S,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner, self._budget_s = inner, budget_s
        self._first_delay_s, self._max_delay_s = first_delay_s, max_delay_s
        self._sleep, self._clock = sleep, clock

    @property
    def name(self) -> str:
        return self._inner.name + "-retry"  # the registry checks it against the name registered (NAME)

    def _retry(self, what: str, call: Callable):
        attempt, deadline = 0, None
        while True:
            try:
                return call()
            except RendezvousConnectionError as exc:
                if not is_transient(exc):
                    raise
                now = self._clock()
                deadline = now + self._budget_s if deadline is None else deadline
                delay = min(self._max_delay_s, self._first_delay_s * 2**attempt)
                attempt += 1
                if now + delay > deadline:
                    print(f"etcd rendezvous: {what} failed {attempt} times: giving up", file=sys.stderr, flush=True)
                    raise
                cause = exc.__cause__ or exc
                print(
                    f"etcd rendezvous: {what} failed ({type(cause).__name__}: {str(cause).strip()[:160]}); retry "
                    f"{attempt} in {delay:.1f} s (gives up {deadline - now:.0f} s from now)",
                    file=sys.stderr,
                    flush=True,
                )
                self._sleep(delay)

    def get_state(self):
        return self._retry("get_state", self._inner.get_state)

    def set_state(self, state: bytes, token=None):
        unsure = False  # an earlier attempt's response was lost: it may have landed

        def once():
            nonlocal unsure
            if unsure:
                current = self._inner.get_state()
                if current is not None and current[0] == state:
                    return current[0], current[1], True  # it landed
                if current is not None and (token is None or str(current[1]) != str(token)):
                    return current[0], current[1], False  # another node wrote: as after a CAS conflict
                # the token we had (or still no key): not landed (yet): the same compare-and-swap again
            was_unsure, unsure = unsure, True
            result = self._inner.set_state(state, token)
            unsure = False
            if was_unsure and result is not None and not result[2] and result[0] == state:
                return result[0], result[1], True  # the lost write landed late; this retry lost the compare
            return result

        return self._retry("set_state", once)


def create_retrying_etcd_v2_handler(params: RendezvousParameters):
    """torch's etcd-v2 handler (its backend, store and dynamic rendezvous) with the backend wrapped."""
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend

    backend, store = create_backend(params)
    budget = float(params.get_as_int("join_timeout", int(DEFAULT_BUDGET_S)) or DEFAULT_BUDGET_S)
    return create_handler(store, RetryingBackend(backend, budget), params)


def main(argv: list[str]) -> None:
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import record

    rendezvous_handler_registry.register(NAME, create_retrying_etcd_v2_handler)
    args = torch_run.parse_args(argv)
    if args.rdzv_backend == "etcd-v2":
        args.rdzv_backend = NAME
    record(torch_run.run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])

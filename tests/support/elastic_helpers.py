"""What the elastic tests share: a real 3-member etcd cluster (a member and an etcd gateway on each training host),
torchrun agents in elastic mode (`--nnodes MIN:MAX --max-restarts K`), evidence read from the run directory and the
logs."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid

from tests.support.common import PYTHON, ROOT, wait_for
from tests.support.train_helpers import FAST, child_env

BATCH = 12  # divisible by world sizes 2 and 3
EVERY = 4  # steps between periodic checkpoints
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see launchers/torchrun.py
RDZV_CONF = "join_timeout=90,last_call_timeout=2,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3"
# etcd-v2 only: torch's etcd client waits read_timeout (default 60 s) for an answer; a request in flight to a member
# whose link went down gets none, and after the timeout python-etcd moves to another member
ETCD_CONF = ",read_timeout=10"


def elastic_train_args(run_dir, steps, *extra) -> list[str]:
    """The digits config made fast, `steps` steps of BATCH images, a committed checkpoint every EVERY steps."""
    return [
        "--config",
        "configs/digits.yaml",
        f"run_dir={run_dir}",
        *FAST,
        f"train.global_batch={BATCH}",
        f"train.total_images={BATCH * steps}",
        f"checkpoint.every_images={BATCH * EVERY}",
        "checkpoint.keep_last=100",
        "train.stop_check_every=1",
        "train.log_every=1",
        "parallel.backend=ddp",
        "parallel.dist_timeout_s=20",
        "parallel.heartbeat_timeout_s=10",  # a cut link is noticed by the heartbeat (no reset closes a connection)
        *extra,
    ]


GATEWAY = "127.0.0.1:23790"  # each host's etcd gateway, on its own loopback: the one endpoint torch's etcd-v2 takes


def _etcd() -> str:
    etcd = shutil.which("etcd")
    if not etcd:
        raise RuntimeError("etcd not found (`make system-deps` installs Debian's etcd-server)")
    return etcd


def member_url(host) -> str:
    return f"http://{host.addr}:2379"


def member_cmd(cluster, host, hosts, data_root) -> list[str]:
    """etcd 3.4, `host`'s member of a static cluster of `hosts`, the v2 API on (torch's etcd-v2 rendezvous needs it).
    The --initial-* flags only count the first time: started again on a data dir that holds a member, etcd ignores
    them and rejoins as that member."""
    url, peer = member_url(host), f"http://{host.addr}:2380"
    return [
        _etcd(),
        f"--name={host.name}",
        f"--data-dir={data_root}/{host.name}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        "--initial-cluster=" + ",".join(f"{h.name}=http://{h.addr}:2380" for h in hosts),
        f"--initial-cluster-token=rdzv-{cluster.tag}",
        "--initial-cluster-state=new",
        "--enable-v2",
        # as an operator would set it (etcd 3.4's default is off): a member cut off keeps campaigning and raising its
        # term; with pre-vote it asks first, so when its link comes back it does not depose the working leader
        "--pre-vote",
    ]


def start_member(cluster, host, hosts, data_root) -> subprocess.Popen:
    """`host`'s member (member_cmd), its output appended to DATA_ROOT/HOST.log; does not wait."""
    os.makedirs(data_root, exist_ok=True)
    log = open(f"{data_root}/{host.name}.log", "a")
    return cluster.popen(host, member_cmd(cluster, host, hosts, data_root), stdout=log, stderr=subprocess.STDOUT)


def start_etcd_cluster(cluster, hosts, data_root) -> dict:
    """A member on each of `hosts` (start_member); waits until every member is healthy and lists them all. Host
    name -> member process."""
    procs = {}
    try:
        for h in hosts:
            procs[h.name] = start_member(cluster, h, hosts, data_root)
        wait_for(lambda: all(health(hosts).values()), 60, f"{len(hosts)} healthy etcd members")
        wait_for(lambda: len(members(hosts[0])) == len(hosts), 30, f"{len(hosts)} etcd members")
    except BaseException:
        for p in procs.values():
            stop(p)
        raise
    return procs


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _healthy(url) -> bool:
    return (_get(f"{url}/health") or {}).get("health") == "true"


def health(hosts) -> dict:
    """Host name -> whether its etcd member answers healthy (it has a leader and serves reads)."""
    return {h.name: _healthy(member_url(h)) for h in hosts}


def members(host) -> dict:
    """Member name -> id, as the member on `host` lists them ({} if it does not answer)."""
    return {m["name"]: m["id"] for m in (_get(f"{member_url(host)}/v2/members") or {}).get("members", [])}


def leader(hosts) -> str:
    """The name of the host whose member is the raft leader ("" if none answers as leader)."""
    states = {h.name: (_get(f"{member_url(h)}/v2/stats/self") or {}).get("state") for h in hosts}
    return next((n for n, s in states.items() if s == "StateLeader"), "")


def make_leader(hosts, host) -> None:
    """Move the raft leadership to `host`'s member (etcd's v3 MoveLeader over its HTTP gateway, asked of the
    current leader; Debian's etcd-server has no etcdctl)."""
    wait_for(lambda: leader(hosts) != "", 30, "an etcd leader")
    current = next(h for h in hosts if h.name == leader(hosts))
    if current.name != host.name:
        body = json.dumps({"targetID": str(int(members(host)[host.name], 16))}).encode()
        url = f"{member_url(current)}/v3/maintenance/transfer-leadership"
        urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=30)
    wait_for(lambda: leader(hosts) == host.name, 30, f"the etcd leader on {host.name}")


def start_gateway(cluster, host, hosts, log_path) -> subprocess.Popen:
    """`etcd gateway` on `host`'s loopback (GATEWAY), forwarding to every member; waits until a request through it
    lists every member. A TCP proxy: a member that refuses a connection is skipped (and retried after a minute)."""
    cmd = [_etcd(), "gateway", "start", f"--listen-addr={GATEWAY}"]
    proc = cluster.popen(
        host,
        [*cmd, "--endpoints=" + ",".join(f"{h.name}:2379" for h in hosts)],
        stdout=open(log_path, "a"),
        stderr=subprocess.STDOUT,
    )
    ask = (
        "import json, urllib.request as u; "
        f"print(len(json.load(u.urlopen('http://{GATEWAY}/v2/members', None, 2))['members']))"
    )
    probe = [*cluster.prefix(host), PYTHON, "-c", ask]
    try:
        wait_for(
            lambda: subprocess.run(probe, capture_output=True, text=True).stdout.strip() == str(len(hosts)),
            30,
            f"the etcd gateway on {host.name}",
            every=0.2,
        )
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """The process by its PID: SIGTERM, then SIGKILL (bounded)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def agent_cmd(nnodes, endpoint, rdzv_id, train_args, backend="etcd-v2", launcher="launchers.torchrun", restarts=3):
    return [
        PYTHON,
        "-m",
        launcher,
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        "1",
        "--max-restarts",
        str(restarts),
        "--rdzv-backend",
        backend,
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        rdzv_id,
        "--rdzv-conf",
        RDZV_CONF + (ETCD_CONF if backend.startswith("etcd") else ""),
        "-m",
        "ddpm_dist.train",
        *train_args,
    ]


def start_agent(cluster, host, run_dir, cmd) -> subprocess.Popen:
    """One agent on `host`, its output appended to RUN.HOST.log beside run_dir. Bare torchrun gets what
    launchers.torchrun sets by itself for elastic runs (NO_SHARED_STORE)."""
    log = open(f"{run_dir}.{host.name}.log", "a")
    env = child_env(**NO_SHARED_STORE)
    return cluster.popen(host, cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def log_of(run_dir, host) -> str:
    path = f"{run_dir}.{host}.log"
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def committed(run_dir) -> list[int]:
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return []
    return sorted(
        int(d.split("_")[1])
        for d in os.listdir(ck)
        if d.startswith("step_") and os.path.exists(os.path.join(ck, d, "COMMITTED"))
    )


def train_rows(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a row being written
    return rows


def audit_rows(run_dir, rank) -> list[dict]:
    """The rows of rank's data audit, in the order written."""
    path = os.path.join(run_dir, "data_audit", f"rank{rank}.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def last_step(run_dir, rank=0) -> int:
    rows = audit_rows(run_dir, rank)
    return rows[-1]["step"] if rows else -1


def resumes(text) -> list[int]:
    """The steps the workers resumed from, in the order the log says so."""
    return [int(m) for m in re.findall(r"resumed from \S*step_(\d+)", text)]


def wait_until(predicate, timeout, what, every=0.05) -> float:
    """wait_for, returning the time it held."""
    wait_for(predicate, timeout, what, every)
    return time.time()

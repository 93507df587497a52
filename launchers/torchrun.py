"""python -m launchers.torchrun [torchrun options] -m ddpm_dist.train --config ...

torchrun with what preemptible jobs need: SIGUSR1, SIGUSR2 and SIGTERM are forwarded to every worker
(torchrun alone dies on SIGUSR1, orphaning its workers, and exits 1 on SIGTERM), and the exit code
is 75 ("requeue me") when the workers stopped for a preemption after saving a checkpoint.
Workers leave their PIDs and exit codes in a private folder named by DDPM_SIGNAL_DIR.

Before the agent starts, the training config is loaded once here: a config error is one line and exit 2, with no
agent started, so it cannot burn --max-restarts. Elastic runs (--nnodes MIN:MAX or --max-restarts > 0): a
preemption signal also stops the agent (else it would restart the workers that stopped to be requeued), and the
agents do not share their rendezvous TCP store with the workers (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; with it
shared, torch 2.14.1 points a host that stays non-zero across rounds at the old rank 0's store, which is gone
when that host died). With --rdzv-backend c10d, losing the host that serves the rendezvous ends the job: the
surviving agents' torchrun fails, and this launcher says so in one line naming the endpoint (exit 1). The agent is
torch.distributed.run started through launchers.etcd_retry: with --rdzv-backend etcd-v2 a rendezvous request that
etcd times out while it elects a new leader (the leader's host died) is retried instead of ending the agent.

Exit codes: 0 done; 2 config error (nothing started); 75 preempted, a checkpoint committed ("requeue me");
otherwise torchrun's (1: the workers failed more than --max-restarts times, or the rendezvous was lost)."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
REQUEUE_EXIT_CODE = 75


def worker_pids(folder: str) -> dict[str, int]:
    pids = {}
    for path in glob.glob(os.path.join(folder, "rank*.pid")):
        try:
            with open(path) as f:
                pids[os.path.basename(path)] = int(f.read().strip())
        except (OSError, ValueError):
            continue
    return pids


def worker_exit_codes(folder: str) -> list[int]:
    """The exit codes of the last worker group (an elastic agent restarts its workers: older files are stale)."""
    started = [os.path.getmtime(p) for p in glob.glob(os.path.join(folder, "rank*.pid"))]
    codes = []
    for path in glob.glob(os.path.join(folder, "rank*.exit")):
        if started and os.path.getmtime(path) < max(started):
            continue
        with open(path) as f:
            codes.append(int(f.read().strip() or 1))
    return codes


def option(argv: list[str], name: str) -> str | None:
    """The value of torchrun option --name (also --name=V and the --snake_case spelling), before the script."""
    names = {name, "--" + name[2:].replace("-", "_")}
    for i, a in enumerate(argv):
        if a in ("-m", "--module") or a.endswith(".py"):
            return None
        key, eq, value = a.partition("=")
        if key in names:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def is_elastic(argv: list[str]) -> bool:
    restarts = option(argv, "--max-restarts") or "0"
    return ":" in (option(argv, "--nnodes") or "") or (restarts.isdigit() and int(restarts) > 0)


def check_config(argv: list[str]) -> str | None:
    """The one-line config error of `-m ddpm_dist.train ARGS` in argv, else None (other entry points: None)."""
    if "-m" not in argv or argv[argv.index("-m") + 1 : argv.index("-m") + 2] != ["ddpm_dist.train"]:
        return None
    from ddpm_dist.config import ConfigError, load_config
    from ddpm_dist.train import build_parser

    try:
        args = build_parser().parse_args(argv[argv.index("-m") + 2 :])
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return check_world_sizes(argv, cfg.train.global_batch, cfg.train.micro_batch)


def check_world_sizes(argv: list[str], batch: int, micro: int | None) -> str | None:
    """An elastic job runs at every world size --nnodes MIN:MAX x --nproc-per-node allows: the global batch (and
    micro-batch) must fit each, else a shrink would fail in every restart."""
    nnodes, nproc = option(argv, "--nnodes") or "1", option(argv, "--nproc-per-node") or "1"
    low, _, high = nnodes.partition(":")
    if not (low.isdigit() and (high or low).isdigit() and nproc.isdigit()):
        return None  # e.g. --nproc-per-node gpu: the workers check
    for world in range(int(low) * int(nproc), int(high or low) * int(nproc) + 1, int(nproc)):
        if batch % world or (micro and (batch // world) % micro):
            return (
                f"train.global_batch={batch}{f' (micro_batch={micro})' if micro else ''} does not fit world size "
                f"{world}, which --nnodes {nnodes} x --nproc-per-node {nproc} may reach; pick one every size divides"
            )
    return None


def c10d_store_lost(argv: list[str]) -> str | None:
    """After torchrun failed: the one line saying the c10d rendezvous endpoint is gone, if it is."""
    if (option(argv, "--rdzv-backend") or "static") != "c10d" or not option(argv, "--rdzv-endpoint"):
        return None
    endpoint = option(argv, "--rdzv-endpoint")
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port or 29400)), timeout=3).close()
        return None
    except (OSError, ValueError):
        return (
            f"error: the c10d rendezvous at {endpoint} does not answer (host {host} down?): with --rdzv-backend c10d "
            "the job ends with the host that serves the rendezvous; use --rdzv-backend etcd-v2 (docs/DISTRIBUTED.md)"
        )


def _exit_with_launcher() -> None:
    """In torchrun's process, before exec: SIGTERM it when this launcher dies (even by SIGKILL), so torchrun
    stops its workers instead of leaving them orphaned (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    error = check_config(argv)
    if error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    elastic = is_elastic(argv)
    folder = tempfile.mkdtemp(prefix="ddpm-signals-")
    received: list[int] = []
    for sig in FORWARDED:
        signal.signal(sig, lambda s, f: received.append(s))
    env = {**os.environ, "DDPM_SIGNAL_DIR": folder}
    if elastic:
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Its own session: a signal to our process group must not reach (and kill) torchrun directly.
    proc = subprocess.Popen(
        [sys.executable, "-m", "launchers.etcd_retry", *argv],  # torch.distributed.run, etcd-v2 retrying
        env=env,
        start_new_session=True,
        preexec_fn=_exit_with_launcher,
    )
    delivered: dict[int, set] = {}
    agent_stopped = False
    try:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                continue
            for sig in received:  # forward each signal once to every worker, including late starters
                for name, pid in worker_pids(folder).items():
                    if (name, pid) not in delivered.setdefault(sig, set()):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            pass
                        delivered[sig].add((name, pid))
            if received and elastic and not agent_stopped:  # it would restart workers that stopped to be requeued
                proc.send_signal(signal.SIGTERM)  # the agent SIGTERMs its workers too: the same preemption path
                agent_stopped = True
        if code == 0:
            return 0
        if REQUEUE_EXIT_CODE in worker_exit_codes(folder):
            return REQUEUE_EXIT_CODE
        lost = c10d_store_lost(argv)
        if lost:
            print(lost, file=sys.stderr, flush=True)
        return code
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""python -m launchers.torchrun [torchrun options] -m ddpm_dist.train --config ...

torchrun with what preemptible jobs need: SIGUSR1, SIGUSR2 and SIGTERM are forwarded to every worker
(torchrun alone dies on SIGUSR1, orphaning its workers, and exits 1 on SIGTERM), and the exit code
is 75 ("requeue me") when the workers stopped for a preemption after saving a checkpoint.
Workers leave their PIDs and exit codes in a private folder named by DDPM_SIGNAL_DIR."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import signal
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
    codes = []
    for path in glob.glob(os.path.join(folder, "rank*.exit")):
        with open(path) as f:
            codes.append(int(f.read().strip() or 1))
    return codes


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
    folder = tempfile.mkdtemp(prefix="ddpm-signals-")
    received: list[int] = []
    for sig in FORWARDED:
        signal.signal(sig, lambda s, f: received.append(s))
    env = {**os.environ, "DDPM_SIGNAL_DIR": folder}
    # Its own session: a signal to our process group must not reach (and kill) torchrun directly.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *argv],
        env=env,
        start_new_session=True,
        preexec_fn=_exit_with_launcher,
    )
    delivered: dict[str, set] = {}
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
                    if name not in delivered.setdefault(sig, set()):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            pass
                        delivered[sig].add(name)
        codes = worker_exit_codes(folder)
        if REQUEUE_EXIT_CODE in codes:
            return REQUEUE_EXIT_CODE
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

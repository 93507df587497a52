"""SIGKILL at random steps and inside saves, restart, repeat: the run ends equal to an uninterrupted one, and
only committed checkpoints are ever loaded. Kill points come from evidence (a save in flight, the launch's own
logged steps), so a slower or busier machine changes the timing, not what is tested."""

import os
import random
import re
import signal
import time

from tests.support.train_helpers import assert_runs_equal, run_train, start_command, train_cmd

# 12 launches each commit at most ~9 steps beyond the one they resumed from (a kill within 8 logged steps or inside
# the next save), so no launch can reach the end before the 12th kill
STEPS = 120
# a checkpoint every 4 steps; the post-hoc EMA profiles too, a snapshot every 6 steps (kills land inside those as well)
EVERY = ["checkpoint.every_images=64", "checkpoint.keep_last=2", "ema.stds=[0.05,0.1]", "ema.snapshot_every_images=96"]


def committed_steps(run_dir):
    ck = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ck):
        return set()
    return {
        int(d.split("_")[1])
        for d in os.listdir(ck)
        if d.startswith("step_") and os.path.exists(os.path.join(ck, d, "COMMITTED"))
    }


def audit_lines(run_dir) -> int:
    """Steps taken so far by all launches (each launch appends one line per step, redone ones included)."""
    path = os.path.join(run_dir, "data_audit", "rank0.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_sigkill_chaos_ends_equal_to_uninterrupted(tmp_path, request):
    ref, run = tmp_path / "ref", tmp_path / "chaos"
    # the uninterrupted run goes on beside the kills (its own directory, one thread of the two cores)
    with open(tmp_path / "ref.log", "w") as log:
        ref_p = start_command(train_cmd(ref, STEPS, *EVERY), stdout=log, stderr=log)
    request.addfinalizer(ref_p.kill)  # a failure below leaves no training behind (a no-op once it has ended)
    rng = random.Random(1234)
    kills, mid_save_kills, launches = 0, 0, []
    deadline = time.time() + 600
    while kills < 12 and time.time() < deadline:
        log_path = tmp_path / f"launch{len(launches)}.log"
        launches.append((log_path, committed_steps(run)))
        with open(log_path, "w") as log:
            p = start_command(train_cmd(run, STEPS, *EVERY), stdout=log, stderr=log)
        ck = run / "checkpoints"
        if kills % 2 == 0:  # once this launch has stepped (start-up cleaned stale .tmp-), kill inside a save
            start, t_end = audit_lines(run), time.time() + 120
            while p.poll() is None and time.time() < t_end and audit_lines(run) <= start:
                time.sleep(0.01)
            while p.poll() is None and time.time() < t_end:
                if ck.is_dir() and any(n.startswith(".tmp-") for n in os.listdir(ck)):
                    mid_save_kills += 1
                    break
                time.sleep(0.002)
        else:  # after a random number of this launch's own steps: evidence, not a guessed time
            start, k = audit_lines(run), rng.randint(1, 8)
            t_end = time.time() + 120
            while p.poll() is None and time.time() < t_end and audit_lines(run) < start + k:
                time.sleep(0.01)
        if p.poll() is not None:  # finished before the kill: start over from the latest checkpoint next time
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 10 and mid_save_kills >= 3, (kills, mid_save_kills)
    before_final = committed_steps(run)
    final = run_train(run, STEPS, *EVERY)  # let it finish
    resumed = 0
    for text, committed in [(open(p_).read(), c) for p_, c in launches] + [(final.stderr, before_final)]:
        m = re.search(r"resumed from (\S+) \(step (\d+)", text)
        if not committed:
            assert m is None
            continue
        if m is None:  # killed while starting up, before it could load anything
            assert "checkpoint committed" not in text and not re.search(r"\] step \d+", text)
            continue
        assert int(m.group(2)) == max(committed), (m.group(0), sorted(committed))
        assert m.group(1).endswith(f"step_{max(committed):09d}")
        resumed += 1
    assert resumed >= 5
    assert ref_p.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-4000:]
    assert_runs_equal(ref, run, snapshots=True)
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp-")]

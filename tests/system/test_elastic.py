"""Elastic training for real: torchrun agents in elastic mode (`--nnodes 2:3 --max-restarts 3`) on three namespace
hosts, rendezvous through a real 3-member etcd cluster, a member on each training host and each agent pointed at its
host's etcd gateway (127.0.0.1:23790). Two faults in one run. A host is SIGKILLed mid-training: the one serving the
workers' store (rank 0) and the etcd raft LEADER (moved there first); the survivors' workers stop (lost peer), n2 and
n3 elect a new leader, their agents re-rendezvous through the 2 members left and training continues at world size 2
from the newest committed checkpoint, without a relaunch. The host comes back (its gateway and agent), the agents
restart their workers with SIGTERM (one committed checkpoint) and go on at world size 3; then its etcd member is
started again on its data dir and rejoins. Then n3's link goes down (its port on the bridge: packets dropped, nothing
reset): the survivors' heartbeat (parallel.heartbeat_timeout_s=10) names n3, n3's worker names the store it lost,
n1 and n2 (2 of 3 members) carry the rendezvous, training goes on at world size 2; the link comes back, n3's own
agent, which kept retrying its rendezvous, rejoins, and the run ends at world size 3, bitwise equal to plain resumes
making the same world-size changes at the same steps. Every agent runs through launchers.torchrun: its agent
retries a rendezvous request etcd times out during an election or while cut off (launchers/etcd_retry.py); bare
torchrun's does not, and its exit ends the job (docs/DISTRIBUTED.md), so no agent here is bare torchrun. Not tested:
losing 2 of the 3 members. With c10d instead, losing the rendezvous host is one line naming the endpoint."""

import re
import signal
import subprocess
import time

import pytest

from tests.support.common import PYTHON, ROOT, wait_for
from tests.support.elastic_helpers import (
    BATCH,
    EVERY,
    GATEWAY,
    agent_cmd,
    audit_rows,
    committed,
    elastic_train_args,
    health,
    leader,
    log_of,
    make_leader,
    new_id,
    resumes,
    start_agent,
    start_etcd_cluster,
    start_gateway,
    start_member,
    stop,
)
from tests.support.train_helpers import (
    assert_bitwise_equal,
    audit,
    checkpoint_tensors,
    child_env,
    final_checkpoint,
    run_command,
)

pytestmark = pytest.mark.system
STEPS = 80  # past the four world-size changes (the last at step 37 in a run here); BATCH * STEPS <= one epoch


@pytest.fixture(scope="module")
def hosts3():
    """n1..n3: each trains and serves an etcd member and a gateway; removed by name and PID at the end."""
    from tests.support.netns_cluster import running

    with running(3) as c:
        yield c


def reference_run(run, segments):
    """Plain resumes on loopback: (world size, last step) per segment, each a fresh torchrun."""
    for world, last in segments:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "-m"]
        r = run_command([*cmd, "ddpm_dist.train", *elastic_train_args(run, last)], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


def logs(run) -> str:
    """The three hosts' logs (rank 0 logs; which host holds rank 0 changes with the rendezvous)."""
    return "\n".join(log_of(run, h) for h in ("n1", "n2", "n3"))


def kept_audit(run, segments) -> dict:
    """(rank, step) -> sample indices of the steps the run kept: a step of a segment at world size W from ranks < W,
    the last record of each (steps re-done after a loss repeat)."""
    out, first = {}, 0
    for world, last in segments:  # the audit's step k is the step taken from step k (0-based) to k + 1
        for rank in range(world):
            rows = audit(run, rank)
            out.update({(rank, s): rows[s] for s in range(first, last)})
        first = last
    return out


# rank 0 logs; the agents' SIGTERMs race, and a rank 0 that was not first says the stop came from another rank
STOP = r"stopping at step (\d+) \((?:signal SIGTERM|a signal on another rank)\)"
LOST = r"error: lost (?:rank \d on (n\d)|the rendezvous store on (n\d))"


def stops(run) -> list[int]:
    """The steps at which the workers stopped for their agent's SIGTERM (a host joining), each once, in order."""
    return sorted({int(s) for s in re.findall(STOP, logs(run))})


def first_lost(text) -> str:
    """The host named by the first lost-peer line of `text` (a lost rank's host or the store's), else ""."""
    m = re.search(LOST, text)
    return (m.group(1) or m.group(2)) if m else ""


def test_a_host_lost_and_back_continues_in_the_job(hosts3, tmp_path):
    c = hosts3
    n1, n2, n3 = c.hosts
    run, rid, etc = tmp_path / "run", new_id(), tmp_path / "etcd"
    args = elastic_train_args(run, STEPS)
    agents, gateways, members = {}, {}, {}
    try:
        members = start_etcd_cluster(c, c.hosts, etc)
        # the raft leader on n1, the host killed: the survivors' rendezvous writes meet the election (retried)
        make_leader(c.hosts, n1)
        for h in (n1, n2, n3):
            gateways[h.name] = start_gateway(c, h, c.hosts, etc / f"gateway.{h.name}.log")
            agents[h.name] = start_agent(c, h, run, agent_cmd("2:3", GATEWAY, rid, args))
        # Evidence, not a sleep: a committed checkpoint, then a step past it.
        wait_for(lambda: len(committed(run)) >= 2, 240, "two committed checkpoints at world size 3")
        wait_for(lambda: audit_rows(run, 0)[-1]["step"] > committed(run)[-1], 60, "a step past the checkpoint")
        killed_at = max(audit_rows(run, r)[-1]["step"] for r in range(3))
        leader_before = leader(c.hosts)
        c.kill_host(n1)  # rank 0, the host whose agent served the workers' store, and the etcd leader
        t_loss = time.time()
        seen = len(audit_rows(run, 0))
        wait_for(lambda: resumes(logs(run)), 120, "the survivors' resume")
        wait_for(lambda: len(audit_rows(run, 0)) > seen, 120, "the first step on the survivors")
        recovery = time.time() - t_loss
        etcd_in_recovery, leader_after = health(c.hosts), leader(c.hosts)
        resumed = min(resumes(logs(run)))
        retries = len(re.findall(r"etcd rendezvous: \w+ failed \(", logs(run)))
        print(
            f"\nn1 (the etcd leader) killed after step {killed_at}: first step on 2 hosts {recovery:.1f} s later "
            f"(from step {resumed}; new leader {leader_after}; {retries} rendezvous request(s) retried)"
        )
        wait_for(lambda: len(audit_rows(run, 0)) > seen + 3, 120, "training at world size 2")
        # n1 back: its gateway and agent (its etcd member only after the rejoin: the job needs 2 of 3 members)
        gateways["n1 again"] = start_gateway(c, n1, c.hosts, etc / "gateway.n1.log")
        agents["n1 again"] = start_agent(c, n1, run, agent_cmd("2:3", GATEWAY, rid, args))
        t_join = time.time()
        wait_for(lambda: stops(run), 120, "restart")
        grown = stops(run)[0]
        wait_for(lambda: grown in resumes(logs(run)), 120, "the resume at world size 3")
        wait_for(lambda: audit_rows(run, 0)[-1]["step"] > grown, 120, "the first step on 3 hosts")
        rejoin = time.time() - t_join
        print(f"host n1 back: first step on 3 hosts {rejoin:.1f} s after its agent started (from step {grown})")
        # n1's etcd member back with its data dir: the link-down below leaves n1 and n2, a quorum only with it
        etcd_before_member = health(c.hosts)
        members["n1 again"] = start_member(c, n1, c.hosts, etc)
        wait_for(lambda: all(health(c.hosts).values()), 60, "n1's etcd member healthy again")
        # n3's link down after a committed checkpoint at world size 3 and a step past it: nothing resets a connection
        wait_for(lambda: committed(run)[-1] > grown, 120, "a committed checkpoint at world size 3")
        wait_for(lambda: audit_rows(run, 0)[-1]["step"] > committed(run)[-1], 60, "a step past the checkpoint")
        cut_at = max(audit_rows(run, r)[-1]["step"] for r in range(3))
        offsets = {h.name: len(log_of(run, h.name)) for h in c.hosts}
        done, rows = len(resumes(logs(run))), len(audit_rows(run, 0))
        c.set_link(n3, False)
        t_cut = time.time()
        wait_for(lambda: len(resumes(logs(run))) > done, 150, "the survivors' resume after the link went down")
        cut_resumed = [r for r in resumes(logs(run)) if r not in (resumed, grown)][0]
        again = lambda: any(r["step"] == cut_resumed for r in audit_rows(run, 0)[rows:])  # noqa: E731
        wait_for(again, 120, "the first step on the survivors of the link down")
        recovery_cut, etcd_in_cut = time.time() - t_cut, health(c.hosts)
        print(
            f"n3's link down after step {cut_at}: first step on 2 hosts {recovery_cut:.1f} s later "
            f"(from step {cut_resumed}; etcd members up {etcd_in_cut})"
        )
        wait_for(lambda: audit_rows(run, 0)[-1]["step"] >= cut_resumed + 3, 120, "training at world size 2 again")
        c.set_link(n3, True)
        t_up = time.time()
        # the cut-off agent rejoins by itself: it kept retrying its rendezvous writes (join_timeout 90 s), no new agent
        wait_for(lambda: len(stops(run)) >= 2 or agents["n3"].poll() is not None, 150, "n3's agent rejoining")
        assert len(stops(run)) >= 2, f"n3's agent exited {agents['n3'].returncode} instead of rejoining"
        regrown = stops(run)[1]
        wait_for(lambda: regrown in resumes(logs(run)), 120, "the resume at world size 3 again")
        wait_for(lambda: audit_rows(run, 0)[-1]["step"] > regrown, 120, "the first step on 3 hosts again")
        rejoin_cut = time.time() - t_up
        print(f"n3's link up: first step on 3 hosts {rejoin_cut:.1f} s later (from step {regrown}; its own agent)")
        survivors = [agents[k] for k in ("n1 again", "n2", "n3")]
        end = time.time() + 300
        for p in survivors:
            p.wait(timeout=max(1, end - time.time()))
        etcd_at_end = health(c.hosts)
    finally:
        for p in [*agents.values(), *gateways.values(), *members.values()]:
            stop(p)
    text = {h: log_of(run, h) for h in ("n1", "n2", "n3")}
    assert [p.returncode for p in survivors] == [0, 0, 0], text["n1"][-2000:] + text["n2"][-2000:] + text["n3"][-2000:]
    # each survivor left by the lost-peer path; the first to notice names n1 (the other may see that survivor go first)
    lost = {h: re.findall(r"error: lost rank \d on (n\d)", text[h])[:1] for h in ("n2", "n3")}
    assert "error: lost rank 0 on n1" in text["n2"] + text["n3"], lost
    assert lost["n2"] in (["n1"], ["n3"]) and lost["n3"] in (["n1"], ["n2"]), lost
    assert re.search(r"2 ranks on n[23] \(rank 0\), n[23] \(rank 1\)", logs(run)), logs(run)[-3000:]
    # the link down: the survivors' heartbeat names n3 (its rank, or the store if it held it); n3's worker, cut off,
    # names the store's host or the rank it watched
    lost_cut = {h: first_lost(text[h][offsets[h] :]) for h in ("n1", "n2", "n3")}
    assert lost_cut["n1"] == lost_cut["n2"] == "n3" and lost_cut["n3"] in ("n1", "n2"), lost_cut
    assert re.search(r"2 ranks on n[12] \(rank 0\), n[12] \(rank 1\)", logs(run)), logs(run)[-3000:]
    assert sorted(set(resumes(logs(run)))) == [resumed, grown, cut_resumed, regrown], resumes(logs(run))
    assert grown in committed(run) and regrown in committed(run)
    assert resumed in committed(run) and killed_at - resumed <= EVERY  # re-done: at most one checkpoint interval
    assert cut_resumed in committed(run) and cut_resumed > grown and cut_at - cut_resumed <= EVERY
    assert recovery < 60, recovery
    assert recovery_cut <= 10 + 60, recovery_cut  # parallel.heartbeat_timeout_s + 60 s
    # the etcd member on n1, the leader, was SIGKILLed and stayed down through the recovery and the rejoin: the job ran
    # on 2 of 3 members, the leader elected among n2 and n3; restarted, it rejoined; with n3 cut off, n1 and n2 served
    assert members["n1"].returncode == -signal.SIGKILL, members["n1"].returncode
    down1, down3 = {"n1": False, "n2": True, "n3": True}, {"n1": True, "n2": True, "n3": False}
    assert etcd_in_recovery == etcd_before_member == down1, (etcd_in_recovery, etcd_before_member)
    assert etcd_in_cut == down3 and all(etcd_at_end.values()), (etcd_in_cut, etcd_at_end)
    assert leader_before == "n1" and leader_after in ("n2", "n3"), (leader_before, leader_after)
    assert "giving up" not in logs(run), logs(run)[-3000:]
    segments = [(3, resumed), (2, grown), (3, cut_resumed), (2, regrown), (3, STEPS)]
    ref = tmp_path / "ref"
    reference_run(ref, segments)
    assert_bitwise_equal(checkpoint_tensors(final_checkpoint(ref)), checkpoint_tensors(final_checkpoint(run)))
    kept = kept_audit(run, segments)
    assert kept == kept_audit(ref, segments)
    indices = [i for v in kept.values() for i in v]
    assert len(indices) == len(set(indices)) == BATCH * STEPS <= 1618  # within one epoch (1618 samples): none twice


def test_c10d_losing_the_rendezvous_host_is_one_line(hosts3, tmp_path):
    """--rdzv-backend c10d on n1: n1 killed, n2's launcher exits within 60 s with one line naming the endpoint."""
    c = hosts3
    n1, n2 = c.hosts[:2]
    run, rid = tmp_path / "run", new_id()
    args = elastic_train_args(run, 10_000)
    agents = [start_agent(c, h, run, agent_cmd("1:2", "n1:29611", rid, args, backend="c10d")) for h in (n1, n2)]
    try:
        wait_for(lambda: audit_rows(run, 1) and audit_rows(run, 1)[-1]["step"] >= 2, 240, "training on 2 hosts")
        c.kill_host(n1)
        t0 = time.time()
        agents[1].wait(timeout=90)
        elapsed = time.time() - t0
    finally:
        for p in agents:
            stop(p)
    text = logs(run)
    line = next((x for x in text.splitlines() if x.startswith("error: the c10d rendezvous")), "")
    assert agents[1].returncode != 0 and "at n1:29611 does not answer (host n1 down?)" in line, text[-3000:]
    print(f"\nc10d rendezvous host lost: n2 exited {elapsed:.1f} s later: {line}")
    assert elapsed < 60, elapsed


@pytest.mark.parametrize(
    "override,line",
    [
        ("train.lr=-1", "error: train.lr: must be positive, got -1.0"),
        ("train.global_batch=16", "error: train.global_batch=16 does not fit world size 3, which --nnodes 2:3 x"),
    ],
)
def test_a_config_error_is_one_line_before_any_agent(tmp_path, override, line):
    """launchers.torchrun loads the training config before it starts the agent, and checks the global batch against
    every world size the job may reach: a bad value is one line and exit 2, with no agent (its rendezvous endpoint
    here answers nobody), so it cannot burn --max-restarts."""
    cmd = agent_cmd("2:3", "127.0.0.1:1", new_id(), elastic_train_args(tmp_path / "run", 4, override))
    t0 = time.time()
    r = run_command(cmd, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), r.stderr
    assert r.stdout == "" and time.time() - t0 < 30 and not (tmp_path / "run").exists()


def test_a_preemption_in_an_elastic_run_is_not_restarted(tmp_path):
    """SIGUSR1 to launchers.torchrun with --max-restarts 3: the workers save one committed checkpoint and the launcher
    exits 75 (requeue me); the agent does not restart the workers that stopped for it."""
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "launchers.torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "3"]
    log = open(tmp_path / "log", "w")
    p = subprocess.Popen(
        [*cmd, "-m", "ddpm_dist.train", *elastic_train_args(run, 10_000)],
        cwd=ROOT,
        env=child_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: audit_rows(run, 1) and audit_rows(run, 1)[-1]["step"] >= 2, 180, "training")
        p.send_signal(signal.SIGUSR1)
        p.wait(timeout=90)
    finally:
        stop(p)
    text = open(tmp_path / "log").read()
    stops = re.findall(r"stopping at step (\d+) \(signal SIG(?:USR1|TERM)\)", text)  # the agent's SIGTERM may be first
    assert p.returncode == 75 and len(stops) == 1 and int(stops[0]) in committed(run), text[-3000:]
    assert "resumed from" not in text and "will restart worker group" not in text, text[-3000:]


def test_slurm_min_nodes_asks_for_a_node_range(capsys):
    """launchers.slurm --min-nodes: the sbatch script asks for MIN-MAX nodes (a dry run; not elastic within a run)."""
    from launchers import slurm

    assert slurm.main(["train", "--nodes", "3", "--min-nodes", "2", "--dry-run", "--", "--config", "x.yaml"]) == 0
    assert "#SBATCH --nodes=2-3\n" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--min-nodes 4: expected 1..--nodes"):
        slurm.main(["train", "--nodes", "3", "--min-nodes", "4", "--dry-run", "--", "--config", "x.yaml"])

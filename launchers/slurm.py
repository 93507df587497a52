"""python -m launchers.slurm train|sample|evaluate|shards [launcher options] -- [arguments of the entry point]

Submits the same entry points torchrun runs, through submitit to SLURM: one task per GPU (or CPU
process), torch.distributed from the SLURM environment (the first node as rendezvous, a port derived
from the job id). Preemption: submitit's preemption signal (USR2, also sent --signal-delay seconds
before the time limit) and our own (USR1, TERM) reach the training loop, whose ranks agree, save a
committed checkpoint and stop; rank 0 then requeues the job, which resumes from that checkpoint by
itself. Requeues are bounded (--max-requeues) and logged.

Examples:
    python -m launchers.slurm train --nodes 2 --gpus-per-node 8 --partition gpu --time 1440 -- \\
        --config configs/cifar10.yaml run_dir=/shared/runs/cifar10
    python -m launchers.slurm train --seeds 0,1,2 -- --config configs/digits.yaml run_dir=runs/digits
    python -m launchers.slurm train --sweep train.lr=1e-4,2e-4 --dry-run -- --config configs/cifar10.yaml
    python -m launchers.slurm sample --gpus-per-node 8 -- --run runs/cifar10 --num-images 50000 --out samples/c10
    python -m launchers.slurm shards --nodes 4 --tasks-per-node 16 -- index 's3://b/crawl/{00000..99999}.tar' \\
        --out /shared/crawl-index      # 64 tasks, each indexes every 64th shard; task 0 writes the manifest
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import time

REQUEUE_EXIT_CODE = 75
VERBS = ("train", "sample", "evaluate", "shards")  # shards: `index` as one task per process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launchers.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("verb", choices=VERBS)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument(
        "--min-nodes",
        type=int,
        default=None,
        help="start with as few as this many nodes (sbatch --nodes=MIN-MAX); training resumes at whatever world size "
        "each (re)queued run gets. Not elastic within a run: a lost node ends it, the requeue resumes",
    )
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node = tasks per node (0: CPU tasks)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="CPU jobs: processes per node (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=4)
    p.add_argument("--mem-gb", type=int, default=0, help="memory per node (0: the partition's default)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    p.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which SLURM sends USR2 (save, requeue)",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, e.g. --sbatch exclusive= --sbatch reservation=r1 (repeatable)",
    )
    p.add_argument("--job-name", default=None)
    p.add_argument("--log-folder", default="slurm_logs/%j")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--seeds", default=None, help="comma list: one job per seed (a job array); run_dir gets -seedN")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one job per combination (a job array); run_dir gets a suffix (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print their results")
    p.epilog = "Everything after -- goes to python -m ddpm_dist.<verb> unchanged."
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, entry point arguments): split at the first --."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def variants(args, argv: list[str]) -> list[tuple[str, list[str]]]:
    """(name suffix, argv) per job: seeds x sweep combinations, each with its own run_dir (train only)."""
    axes = []
    if args.seeds:
        axes.append([("seed", s.strip()) for s in args.seeds.split(",")])
    for spec in args.sweep:
        if "=" not in spec:
            raise SystemExit(f"error: --sweep '{spec}': expected key=v1,v2")
        key, values = spec.split("=", 1)
        axes.append([(key, v) for v in values.split(",")])
    if not axes:
        return [("", argv)]
    out = []
    for combo in itertools.product(*axes):
        suffix = "-".join(f"{k.split('.')[-1]}{v}" for k, v in combo)
        extra = [f"{k}={v}" for k, v in combo]
        new = [a for a in argv]
        for i, a in enumerate(new):
            if a.startswith("run_dir="):
                new[i] = f"{a}-{suffix}"
        if not any(a.startswith("run_dir=") for a in new) and args.verb == "train":
            new.append(f"run_dir=runs/{args.job_name or 'job'}-{suffix}")
        out.append((suffix, new + extra))
    return out


class Job:
    """What each SLURM task runs (pickled by submitit). Checkpointable: if a preemption signal arrives
    before training installs its own handler, submitit requeues the job as it is."""

    def __init__(self, verb: str, argv: list[str], max_requeues: int):
        self.verb, self.argv, self.max_requeues = verb, argv, max_requeues

    def __call__(self):
        import submitit

        job_env = submitit.JobEnvironment()
        # Ranks, local ranks and the master (the first host of SLURM_JOB_NODELIST, a port from the job id) come
        # from SLURM's own variables in ddpm_dist.parallel.env.read_env, as under a bare srun.
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if job_env.global_rank == 0:
            print(
                f"[launchers.slurm] job {job_env.job_id}: {self.verb} on {job_env.num_tasks} task(s), "
                f"requeue {restarts} of at most {self.max_requeues}",
                flush=True,
            )
        code = run_entry(self.verb, self.argv)
        if code == REQUEUE_EXIT_CODE:
            if job_env.global_rank == 0:
                if restarts >= self.max_requeues:
                    print(f"[launchers.slurm] not requeuing: {restarts} requeues already (--max-requeues)", flush=True)
                    raise RuntimeError("preempted too many times")
                print(f"[launchers.slurm] requeuing job {job_env.job_id} (requeue {restarts + 1})", flush=True)
                subprocess.run(["scontrol", "requeue", job_env.job_id], check=True)
            time.sleep(60)  # the requeue ends this job; do not report a result for it
            sys.exit(-1)
        if code:
            raise RuntimeError(f"{self.verb} exited with code {code}")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(Job(self.verb, self.argv, self.max_requeues))


def run_entry(verb: str, argv: list[str]) -> int:
    """The entry point's main(), in this process (the SLURM task); returns its exit code."""
    from ddpm_dist import evaluate, sample, shards, train

    module = {"train": train, "sample": sample, "evaluate": evaluate, "shards": shards}[verb]
    try:
        return module.main(argv) or 0
    except SystemExit as e:
        return int(e.code or 0)


def make_executor(args):
    import submitit

    if not args.dry_run and not shutil.which("sbatch"):
        raise SystemExit(
            "error: sbatch not found: this launcher submits to SLURM (use torchrun or launchers.torchrun locally)"
        )
    executor = submitit.AutoExecutor(folder=args.log_folder, cluster="slurm")
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    extra = {}
    for kv in args.sbatch:
        key, _, value = kv.partition("=")
        extra[key.lstrip("-")] = value if value else True
    if args.min_nodes is not None:
        if not 1 <= args.min_nodes <= args.nodes:
            raise SystemExit(f"error: --min-nodes {args.min_nodes}: expected 1..--nodes ({args.nodes})")
        if args.min_nodes < args.nodes:
            extra["nodes"] = f"{args.min_nodes}-{args.nodes}"
    params = dict(
        nodes=args.nodes,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        name=args.job_name or f"ddpm-{args.verb}",
        slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters=extra,
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**params)
    return executor


def dry_run(args, jobs) -> int:
    from submitit.slurm.slurm import SlurmExecutor

    ex = make_executor(args)
    inner = ex._executor if hasattr(ex, "_executor") else ex
    assert isinstance(inner, SlurmExecutor)
    for suffix, argv in jobs:
        print(f"# job {suffix or args.verb}: python -m ddpm_dist.{args.verb} {' '.join(argv)}")
        print(inner._make_submission_file_text("python -u -m submitit.core._submit <folder>", "<uid>"))
    return 0


def main(argv: list[str]) -> int:
    mine, entry = split_argv(argv)
    args = build_parser().parse_args(mine)
    jobs = variants(args, entry)
    if args.dry_run:
        return dry_run(args, jobs)
    executor = make_executor(args)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR2"
    with executor.batch():  # one job array for seeds / sweeps
        submitted = [executor.submit(Job(args.verb, a, args.max_requeues)) for _, a in jobs]
    for (suffix, _), job in zip(jobs, submitted):
        print(f"submitted job {job.job_id} ({args.verb}{' ' + suffix if suffix else ''})")
        print(f"  logs:   {job.paths.stdout}  {job.paths.stderr}")
        print(f"  follow: tail -f {job.paths.stderr}    state: squeue -j {job.job_id}    cancel: scancel {job.job_id}")
    if args.wait:
        for job in submitted:
            print(f"job {job.job_id}: {job.result()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`torchrun ... -m tests.support.parity_main OUT BACKEND [JSON kwargs]`: the engine parity harness of
tests/distributed/test_parallel.py (a fixed global batch, tests/dist_workers.train_steps) under any launcher, so the
same comparison with one process runs across hosts."""

import json
import sys

import torch

from ddpm_dist.parallel.env import init_distributed, read_env
from tests.support.dist_workers import parity_worker

if __name__ == "__main__":
    out, backend = sys.argv[1], sys.argv[2]
    kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)
    env = init_distributed(read_env())
    parity_worker(env.rank, env.world_size, out, backend, kwargs)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

"""Run a function on plain-PyTorch gloo workers (torch.multiprocessing), for tests that compare
facegen's distributed code against a single process."""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loopback import free_port


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)  # as Ray sets OMP_NUM_THREADS for a worker with a fraction of a CPU
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()
        # DistributedDataParallel leaves garbage in reference cycles (functions and cells of its
        # hooks); left to interpreter shutdown, what they hold is torn down with C++ threads still
        # joinable and the process aborts ("terminate called without an active exception", torch
        # 2.13 + gloo, about 1 exit in 8 here). Collected now, the exit is clean.
        gc.collect()


def spawn_gloo(fn, *args, world_size: int = 2) -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` gloo workers on loopback; raises if one fails."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)

"""The one timing rule every benchmark here uses: one warm-up call, then the best of ``repeat``."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_rate(fn: Callable[[], object], items: int, repeat: int = 2, cuda: bool = False) -> float:
    """``items`` per second of ``fn`` at its fastest of ``repeat`` timed calls after a warm-up.

    With ``cuda`` the GPU is synchronised around each call, so queued kernels count.
    """
    sync: Callable[[], None] = lambda: None  # noqa: E731
    if cuda:
        import torch

        sync = torch.cuda.synchronize
    fn()  # warm-up (model load caches, cuDNN autotune, the allocator)
    best = float("inf")
    for _ in range(repeat):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - started)
    return items / best

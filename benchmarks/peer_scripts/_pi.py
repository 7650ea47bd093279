"""The seed's S1 workload, shared by the peer scripts: pi from n random points in pure Python."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

BLOCKS = (1, 2, 4, 5, 10, 20, 100)
CALLS = 100


def pi(n: int) -> float:
    inside = 0
    for _ in range(n):
        x = random.random()
        y = random.random()
        if x * x + y * y <= 1.0:
            inside += 1
    return 4.0 * inside / n


def time_blocks(run_block: Callable[[int, int], Sequence[Any]], n: int) -> dict[str, float]:
    """For each block size b: 100 calls in blocks of b concurrent calls, waiting for each block."""
    timings = {}
    for block in BLOCKS:
        t0 = time.perf_counter()
        for _ in range(CALLS // block):
            values = run_block(block, n)
            assert len(values) == block and all(3.0 < v < 3.3 for v in values)
        timings[str(block)] = time.perf_counter() - t0
    return timings

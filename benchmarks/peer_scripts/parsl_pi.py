"""S1 on Parsl's HighThroughputExecutor (workers = cores, local provider). Prints one JSON line."""

from __future__ import annotations

import os
import sys
import tempfile

import parsl
from _harness import CORES, emit
from _pi import time_blocks
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider


@parsl.python_app
def pi_app(n: int) -> float:
    import random

    inside = 0
    for _ in range(n):
        x = random.random()
        y = random.random()
        if x * x + y * y <= 1.0:
            inside += 1
    return 4.0 * inside / n


def main(n: int) -> None:
    run_dir = tempfile.mkdtemp(prefix="parsl-bench-")
    config = Config(
        executors=[HighThroughputExecutor(label="htex", max_workers_per_node=CORES,
                                          provider=LocalProvider(init_blocks=1, max_blocks=1))],
        run_dir=run_dir,
    )
    parsl.load(config)
    try:
        pi_app(1000).result()  # workers are up
        timings = time_blocks(lambda b, k: [f.result() for f in [pi_app(k) for _ in range(b)]], n)
    finally:
        parsl.dfk().cleanup()
    emit({"peer": "parsl", "blocks": timings, "cores": os.cpu_count()})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)

"""S1 baseline: the 100 calls one after another in one process."""

from __future__ import annotations

import sys
import time

from _harness import emit
from _pi import CALLS, pi


def main(n: int) -> None:
    t0 = time.perf_counter()
    for _ in range(CALLS):
        pi(n)
    emit({"peer": "sequential", "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)

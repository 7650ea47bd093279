"""Shared pieces of the benchmarks: a result row, repetition with median and spread, a printed table.

Every benchmark script ``benchmarks/bench_<name>.py``:

* defines ``def measure(repeats: int = 3) -> list[Row]`` (the suite runner imports and calls it), and
* runs standalone (``python benchmarks/bench_<name>.py``), printing its rows with :func:`print_rows`.

Each row compares a subject (taskstream) against a baseline measured in the same run on the same servers,
as a ratio. ``higher_is_better`` says which way the ratio reads (rates: True; latencies: False).
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Row", "machine_info", "print_rows", "repeat", "repeat_async"]


@dataclass
class Row:
    """One comparison: ``value`` of the subject against ``baseline_value`` of the baseline."""

    workload: str
    subject: str
    baseline: str
    unit: str
    values: list[float]
    baseline_values: list[float]
    higher_is_better: bool = True
    target: float | None = None  # the ratio the project aims for (None: informational)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def baseline_value(self) -> float:
        return statistics.median(self.baseline_values)

    @property
    def ratio(self) -> float:
        """Subject relative to baseline, oriented so that > 1 means taskstream is better."""
        if self.higher_is_better:
            return self.value / self.baseline_value if self.baseline_value else float("nan")
        return self.baseline_value / self.value if self.value else float("nan")

    @property
    def spread(self) -> float:
        """Relative spread (max - min) / median of the subject's repetitions."""
        return (max(self.values) - min(self.values)) / self.value if self.value else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(value=self.value, baseline_value=self.baseline_value, ratio=self.ratio, spread=self.spread)
        return data


def repeat(fn: Callable[[], float], repeats: int) -> list[float]:
    """Call ``fn`` ``repeats`` times, returning each figure."""
    return [fn() for _ in range(repeats)]


def repeat_async(fn: Callable[[], Awaitable[float]], repeats: int) -> list[float]:
    """Run the coroutine function ``fn`` ``repeats`` times in fresh event loops."""
    return [asyncio.run(fn()) for _ in range(repeats)]


def machine_info() -> dict[str, Any]:
    """Cores, Python and platform, recorded with every result."""
    return {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_rows(rows: list[Row]) -> None:
    """Print rows as an aligned table with ratios (> 1 means taskstream is better)."""
    print(f"{'workload':<34} {'taskstream':>14} {'baseline':>14} {'unit':<8} {'ratio':>7} {'target':>7}  baseline")
    for row in rows:
        target = f"{row.target:.2f}" if row.target is not None else "-"
        print(
            f"{row.workload:<34} {row.value:>14.1f} {row.baseline_value:>14.1f} {row.unit:<8} "
            f"{row.ratio:>7.2f} {target:>7}  {row.baseline} (spread {row.spread:.0%})"
        )

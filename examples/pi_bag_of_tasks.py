"""S1: a bag of tasks with futures (Parsl's pi, from the seed article).

``pi(n)`` estimates pi from ``n`` random points in pure Python. 100 calls of ``pi(10**6)`` run in blocks of
1, 2, 4, 5, 10, 20 and 100 concurrent futures; each block is awaited before the next starts, and every block
size is timed. ``pi`` is ``cpu_bound``, so its calls run on worker processes and use every core. The script
prints the table next to the seed's figures and writes a plot like the seed's Figure 3.

    python examples/pi_bag_of_tasks.py                        # memory broker: worker processes in this program
    python examples/pi_bag_of_tasks.py --calls 20 --n 200000  # a quicker run
    python examples/pi_bag_of_tasks.py --broker amqp://guest:guest@127.0.0.1:5672/
        # starts `taskstream worker examples.pi_bag_of_tasks:app` for the run and only submits from here
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskstream import App, Task, gather

QUEUE = os.environ.get("PI_QUEUE", "pi")  # a worker process serves the queue main() tells it
BLOCKS = (1, 2, 4, 5, 10, 20, 100)

# The seed's measurements on a 4-core Azure VM (seconds for 100 x pi(10**6)).
SEED_SEQUENTIAL = 32.7
SEED_DASK = {1: 32.0, 2: 16.5, 4: 9.9, 5: 10.6, 10: 10.8, 20: 9.7, 100: 9.6}
SEED_PARSL = {1: 36.1, 2: 18.0, 4: 12.5, 5: 11.0, 10: 15.6, 20: 15.3, 100: 15.7}

app = App()  # TASKSTREAM_BROKER_URL, the embedded memory broker by default


@app.task(queue=QUEUE, cpu_bound=True)
def pi(n: int) -> float:
    """Estimate pi from ``n`` random points in the unit square (pure Python, CPU-bound)."""
    inside = 0
    rand = random.random
    for _ in range(n):
        x, y = rand(), rand()
        if x * x + y * y <= 1.0:
            inside += 1
    return 4.0 * inside / n


@dataclass
class Report:
    """What one run measured."""

    calls: int
    n: int
    cores: int
    sequential: float
    blocks: dict[int, float] = field(default_factory=dict)
    estimates: list[float] = field(default_factory=list)
    plot: Path | None = None

    def speedup(self, block: int) -> float:
        return self.sequential / self.blocks[block]

    def table(self) -> str:
        lines = [
            f"{self.calls} x pi({self.n}) on {self.cores} core(s); sequential (in this process): "
            f"{self.sequential:.2f} s",
            f"{'block':>6} {'seconds':>9} {'vs seq':>7}   seed Dask  seed Parsl  (4-core VM, 100 x pi(10**6))",
        ]
        for block, seconds in self.blocks.items():
            dask = f"{SEED_DASK[block]:>9.1f}" if block in SEED_DASK else f"{'-':>9}"
            parsl = f"{SEED_PARSL[block]:>11.1f}" if block in SEED_PARSL else f"{'-':>11}"
            lines.append(f"{block:>6} {seconds:>9.2f} {self.sequential / seconds:>6.2f}x  {dask}  {parsl}")
        if 5 in self.blocks and 100 in self.blocks:
            lines.append(f"100 concurrent vs 5 concurrent: {self.blocks[100] / self.blocks[5]:.2f}x the time")
        return "\n".join(lines)


def run_blocks(
    task: Task[Any, Any], calls: int, n: int, blocks: tuple[int, ...]
) -> tuple[dict[int, float], list[float]]:
    """Time ``calls`` calls of ``task(n)`` for each block size: submit a block, wait for it, next block."""
    times: dict[int, float] = {}
    estimates: list[float] = []
    for block in blocks:
        started = time.perf_counter()
        for first in range(0, calls, block):
            estimates.extend(gather(task.map([n] * min(block, calls - first)), progress=False).result())
        times[block] = time.perf_counter() - started
    return times, estimates


def plot(report: Report, path: Path) -> Path:
    """A plot like the seed's Figure 3: time for the whole bag against block size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = list(report.blocks)
    ax.plot(sizes, list(report.blocks.values()), "o-", label=f"taskstream ({report.cores} cores, this machine)")
    ax.axhline(report.sequential, color="grey", linestyle=":", label="sequential (this machine)")
    if report.n == 10**6 and report.calls == 100:
        ax.plot(list(SEED_DASK), list(SEED_DASK.values()), "s--", alpha=0.6, label="Dask bag (seed, 4-core VM)")
        ax.plot(list(SEED_PARSL), list(SEED_PARSL.values()), "^--", alpha=0.6, label="Parsl HTEX (seed, 4-core VM)")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("concurrent futures per block")
    ax.set_ylabel("seconds for the whole bag")
    ax.set_title(f"{report.calls} x pi({report.n}) in blocks")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _start_worker(broker: str, processes: int, queue: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TASKSTREAM_BROKER_URL=broker, PI_QUEUE=queue)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "taskstream.cli", "worker", "examples.pi_bag_of_tasks:app"]
    return subprocess.Popen([*command, "--queues", queue, "--processes", str(processes)], env=env, cwd=root)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="calls in the bag (100)")
    parser.add_argument("--n", type=int, default=10**6, help="points per call (10**6)")
    parser.add_argument("--blocks", default=",".join(map(str, BLOCKS)), help="block sizes, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("pi_bag_of_tasks.png"), help="plot file (PNG)")
    parser.add_argument("--broker", default=None, help="a real broker URL: a worker process is started for it")
    parser.add_argument("--queue", default=QUEUE, help=f"the task queue on that broker ({QUEUE})")
    args = parser.parse_args(argv)
    blocks = tuple(int(b) for b in args.blocks.split(","))
    cores = os.cpu_count() or 1

    started = time.perf_counter()
    for _ in range(args.calls):
        pi(args.n)
    report = Report(args.calls, args.n, cores, time.perf_counter() - started)

    worker = _start_worker(args.broker, cores, args.queue) if args.broker else None
    client = App(args.broker, workers=False) if args.broker else app
    task = client.remote("pi", queue=args.queue) if args.broker else pi
    try:
        with client:
            gather(task.map([1000] * cores)).result(timeout=120)  # warm-up: worker processes started
            report.blocks, report.estimates = run_blocks(task, args.calls, args.n, blocks)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
    print(report.table())
    report.plot = plot(report, args.out)
    print(f"plot: {report.plot}")
    return report


if __name__ == "__main__":
    main()

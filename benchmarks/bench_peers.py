"""taskstream against the frameworks users would pick instead, on the same servers in the same run.

1. Task round trips on RabbitMQ (the workload of ``bench_tasks.py``): N no-op tasks submitted then awaited, and
   sequential round trips for p50 latency. taskstream (worker in its own process, SQLite result store) against
   Celery (prefork, concurrency = cores, rpc:// results), Dramatiq (RabbitMQ + Redis results), TaskIQ
   (taskiq-aio-pika + Redis results) and FastStream request/reply.
2. The seed's S1 table: 100 x pi(n) in blocks of 1, 2, 4, 5, 10, 20, 100 concurrent calls, each block awaited
   before the next. taskstream (``examples/pi_bag_of_tasks.py``: cpu_bound tasks on worker processes, memory
   broker) against sequential, Parsl (HighThroughputExecutor), Dask (distributed, worker processes) and Celery.
   Writes ``benchmarks/results/s1_pi_blocks.png``, the seed's Figure 3 redrawn with every framework.

Peers run from their own venv (``benchmarks/peers.py``). ``BENCH_PI_N`` sets n (default 200,000, so a full
suite stays under 20 minutes; the seed used 10**6); ``BENCH_PEER_TASKS_N`` / ``BENCH_PEER_TASKS_SEQ`` the
round-trip counts (default 2,000 and 100).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench_tasks  # noqa: E402
from common import Row, print_rows  # noqa: E402
from peers import run_peer  # noqa: E402

PI_N = int(os.environ.get("BENCH_PI_N", "200000"))
TASKS_N = int(os.environ.get("BENCH_PEER_TASKS_N", "2000"))
TASKS_SEQ = int(os.environ.get("BENCH_PEER_TASKS_SEQ", "100"))
SCRIPTS = HERE / "peer_scripts"
RESULTS = HERE / "results"
TASK_PEERS = ("celery", "dramatiq", "taskiq", "faststream")
PI_PEERS = ("parsl", "dask", "celery")
BLOCKS = (1, 2, 4, 5, 10, 20, 100)


# -- 1. task round trips ------------------------------------------------------------------------------


def taskstream_round_trips(repeats: int) -> list[dict[str, float]]:
    queue = f"bench-peers-ts-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/results.sqlite3"
        env = dict(os.environ, TASKSTREAM_RESULT_STORE_URL=store)
        os.environ["TASKSTREAM_RESULT_STORE_URL"] = store
        server = bench_tasks._serve("taskstream", queue, env)
        try:
            time.sleep(3.0)

            async def one() -> dict[str, float]:
                async with bench_tasks.taskstream_app(queue, worker=False) as app:
                    await bench_tasks.taskstream_throughput(app, 200)
                    rate = await bench_tasks.taskstream_throughput(app, TASKS_N)
                    latencies = await bench_tasks.taskstream_latencies(app, TASKS_SEQ)
                return {"throughput": rate, "p50_ms": statistics.median(latencies) * 1000}

            return [asyncio.run(one()) for _ in range(repeats)]
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            os.environ.pop("TASKSTREAM_RESULT_STORE_URL", None)
            asyncio.run(bench_tasks._delete_queues([queue, f"{queue}.dlq"]))


def task_rows(repeats: int) -> list[Row]:
    print("  peers: task round trips, taskstream", flush=True)
    ours = taskstream_round_trips(repeats)
    rows = []
    for peer in TASK_PEERS:
        print(f"  peers: task round trips, {peer}", flush=True)
        theirs = [run_peer(SCRIPTS / f"{peer}_tasks.py", str(TASKS_N), str(TASKS_SEQ)) for _ in range(repeats)]
        rows.append(
            Row(
                f"tasks: {TASKS_N} no-op, throughput",
                "taskstream",
                peer,
                "tasks/s",
                [r["throughput"] for r in ours],
                [r["throughput"] for r in theirs],
                target=2.0 if peer == "dramatiq" else 1.0,  # issue 15: twice Dramatiq's throughput
            )
        )
        rows.append(
            Row(
                f"tasks: {TASKS_SEQ} sequential, p50",
                "taskstream",
                peer,
                "ms",
                [r["p50_ms"] for r in ours],
                [r["p50_ms"] for r in theirs],
                higher_is_better=False,
                target=1.0,
            )
        )
    return rows


# -- 2. S1: pi in blocks -------------------------------------------------------------------------------


def taskstream_pi_blocks() -> dict[str, float]:
    from examples import pi_bag_of_tasks as s1
    from taskstream import gather

    with s1.app:
        gather(s1.pi.map([1000] * (os.cpu_count() or 1))).result(timeout=120)  # worker processes up
        times, _ = s1.run_blocks(s1.pi, 100, PI_N, BLOCKS)
    return {str(block): seconds for block, seconds in times.items()}


def pi_rows(repeats: int) -> tuple[list[Row], dict[str, list[dict[str, float]]]]:
    runs: dict[str, list[dict[str, float]]] = {"taskstream": [], **{p: [] for p in PI_PEERS}}
    sequential: list[float] = []
    for i in range(repeats):
        print(f"  peers: S1 pi blocks, repetition {i + 1}/{repeats}: sequential", flush=True)
        sequential.append(run_peer(SCRIPTS / "sequential_pi.py", str(PI_N))["seconds"])
        print("  peers: S1 pi blocks: taskstream", flush=True)
        runs["taskstream"].append(taskstream_pi_blocks())
        for peer in PI_PEERS:
            print(f"  peers: S1 pi blocks: {peer}", flush=True)
            runs[peer].append(run_peer(SCRIPTS / f"{peer}_pi.py", str(PI_N))["blocks"])
    ours = runs["taskstream"]
    rows = [
        Row(
            f"S1 100 x pi({PI_N}), block {b}",
            "taskstream",
            "sequential",
            "s",
            [r[str(b)] for r in ours],
            sequential,
            higher_is_better=False,
            target=1.7 if b >= 2 else None,
            notes="target on 2 cores: about half the sequential time",
        )
        for b in (1, 2, 100)
    ]
    for peer in PI_PEERS:
        rows += [
            Row(
                f"S1 100 x pi({PI_N}), block {b}",
                "taskstream",
                peer,
                "s",
                [r[str(b)] for r in ours],
                [r[str(b)] for r in runs[peer]],
                higher_is_better=False,
                target=1.0 if b >= 2 else None,
            )
            for b in BLOCKS
        ]
    runs["sequential"] = [{str(b): s for b in BLOCKS} for s in sequential]
    return rows, runs


def plot_pi(runs: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, results in runs.items():
        medians = [statistics.median(r[str(b)] for r in results) for b in BLOCKS]
        style = ":" if name == "sequential" else ("o-" if name == "taskstream" else "s--")
        ax.plot(BLOCKS, medians, style, label=name, linewidth=2.5 if name == "taskstream" else 1.2)
    ax.set_xscale("log")
    ax.set_xticks(BLOCKS, [str(b) for b in BLOCKS])
    ax.set_xlabel("concurrent calls per block")
    ax.set_ylabel("seconds for 100 calls (median)")
    ax.set_title(f"S1: 100 x pi({PI_N}) in blocks, {os.cpu_count()} cores, same run")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(repeats: int = 3) -> list[Row]:
    rows = task_rows(repeats)
    s1_rows, runs = pi_rows(repeats)
    plot_pi(runs, RESULTS / "s1_pi_blocks.png")
    return rows + s1_rows


def _main(argv: list[str]) -> dict[str, Any]:
    repeats = int(argv[1]) if len(argv) > 1 else 1
    rows = measure(repeats)
    print_rows(rows)
    return {}


if __name__ == "__main__":
    _main(sys.argv)

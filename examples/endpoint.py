"""S2: a function endpoint (funcX-style).

An *endpoint* is a worker serving the queue ``endpoint`` (``--queue`` or ``ENDPOINT_QUEUE`` name another).
Clients submit calls to it **by name** (they need not have the code), get a task id at once, and ask for status
(``pending``, ``running``, ``success``, ``failed``) and the result by that id, later, from any client. A batch
of calls goes out in one go. The sync API also works inside Jupyter, whose cells run inside an event loop.

    taskstream worker examples.endpoint:app --queues endpoint --broker amqp://guest:guest@127.0.0.1:5672/
    python examples/endpoint.py --broker amqp://guest:guest@127.0.0.1:5672/   # a client session
    python examples/endpoint.py --broker amqp://... --start-endpoint            # starts the endpoint for you
    python examples/endpoint.py                                                # endpoint + client in-process

On the memory broker the endpoint runs inside this program (hub ``memory://endpoint``, which the client Apps
share); on a real broker the endpoint is a separate process and clients share its result store (the host's
SQLite file by default, or ``TASKSTREAM_RESULT_STORE_URL``, e.g. Redis for clients on other hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from taskstream import App, TaskInfo, gather

QUEUE = os.environ.get("ENDPOINT_QUEUE", "endpoint")  # an endpoint process serves the queue main() tells it
MEMORY_HUB = "memory://endpoint"

ABSTRACTS = [
    "We prove a sharp bound on the spectral gap of random regular graphs using the trace method.",
    "Effective field theories that violate the null energy condition cannot couple minimally to gravity.",
    "A transformer model classifies protein sequences and predicts their folding stability in cells.",
    "We study the pricing of American options under stochastic volatility with jumps in the market.",
    "A distributed scheduler for serverless functions cuts cold-start latency on edge devices.",
]
KEYWORDS = {
    "math": {"prove", "bound", "graphs", "theorem", "spectral"},
    "physics": {"energy", "gravity", "field", "quantum", "condition"},
    "biology": {"protein", "cells", "folding", "sequences", "gene"},
    "finance": {"pricing", "options", "volatility", "market"},
    "computer science": {"distributed", "scheduler", "serverless", "latency", "functions"},
}

# The endpoint: on a real broker `taskstream worker examples.endpoint:app` serves it.
app = App(os.environ.get("TASKSTREAM_BROKER_URL") or MEMORY_HUB)


@app.task(queue=QUEUE)
def classify(text: str) -> str:
    """A tiny keyword classifier: the subject whose keywords the abstract mentions most."""
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    scores = {subject: sum(words[k] for k in keys) for subject, keys in KEYWORDS.items()}
    return max(scores, key=lambda subject: scores[subject])


@app.task(queue=QUEUE)
def word_count(text: str) -> int:
    """Words in ``text``."""
    return len(text.split())


@app.task(queue=QUEUE)
async def slow_echo(value: Any, seconds: float = 0.5) -> Any:
    """Waits, then answers: long enough to watch it go pending -> running -> success."""
    await asyncio.sleep(seconds)
    return value


def watch(client: App, task_id: str, timeout: float = 30.0) -> list[str]:
    """Poll a task's status by id until it finishes; returns the distinct statuses seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_task(task_id).status
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in ("success", "failed", "cancelled"):
            break
        time.sleep(0.02)
    return seen


def client_session(broker: str, queue: str = QUEUE) -> dict[str, Any]:
    """What a funcX user does from a script: submit by name, ids at once, status and results by id."""
    report: dict[str, Any] = {}
    with App(broker, workers=False) as client:
        run = client.remote("classify", queue=queue)  # by name: this client has no code for it
        future = run.submit(ABSTRACTS[1])
        print(f"submitted classify -> task id {future.task_id} (returned at once)")
        print(f"  result: {future.result(timeout=60)!r}")
        report["single"] = future.result()

        slow = client.remote("slow_echo", queue=queue).submit("hello", seconds=0.5)
        report["statuses"] = watch(client, slow.task_id)
        print(f"  slow_echo {slow.task_id}: {' -> '.join(report['statuses'])}")

        batch = run.map(ABSTRACTS)  # a batch of calls in one go (one publish per queue)
        report["batch"] = gather(batch).result(timeout=60)
        report["batch_ids"] = [f.task_id for f in batch]
        for text, subject in zip(ABSTRACTS, report["batch"], strict=True):
            print(f"  {subject:<17} <- {text[:60]}...")
        counts = client.remote("word_count", queue=queue).map(ABSTRACTS, chunksize=5)
        report["word_counts"] = gather(counts).result(timeout=60)
        report["first_id"] = future.task_id
    return report


def another_client(broker: str, task_ids: list[str]) -> list[TaskInfo]:
    """A different client, later: it only has the ids."""
    other = App(broker, workers=False)  # never started: get_task reads the result store directly
    infos = [other.get_task(task_id) for task_id in task_ids]
    for info in infos:
        took = (info.finished_at or 0) - (info.started_at or 0)
        print(f"  {info.task_id} {info.name:<10} {info.status:<8} {info.outcome()!r:<20} ran {took * 1000:.1f} ms")
    return infos


def notebook_cell(broker: str, queue: str = QUEUE) -> Any:
    """A Jupyter cell runs inside an event loop; the sync API still works there (and ``await`` does too)."""

    async def cell() -> Any:
        with App(broker, workers=False) as client:
            future = client.remote("word_count", queue=queue).submit("one two three")
            blocking = future.result(timeout=60)  # plain sync call inside a running loop
            awaited = await client.remote("classify", queue=queue).submit(ABSTRACTS[0])
            return blocking, awaited

    return asyncio.run(cell())


def _start_endpoint(broker: str, queue: str) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TASKSTREAM_BROKER_URL=broker, ENDPOINT_QUEUE=queue)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "taskstream.cli", "worker", "examples.endpoint:app", "--queues", queue]
    return subprocess.Popen(command, env=env, cwd=root)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=None, help="a real broker URL (default: the in-process memory hub)")
    parser.add_argument("--start-endpoint", action="store_true", help="start the endpoint worker for this run")
    parser.add_argument("--queue", default=QUEUE, help=f"the endpoint's queue on a real broker ({QUEUE})")
    args = parser.parse_args(argv)
    broker = args.broker or MEMORY_HUB
    queue = args.queue if args.broker else QUEUE  # the in-process endpoint serves QUEUE
    with contextlib.ExitStack() as stack:
        if args.broker is None:
            stack.enter_context(app)  # the memory hub's endpoint runs inside this program
        elif args.start_endpoint:
            endpoint = _start_endpoint(broker, queue)
            stack.callback(endpoint.wait, 60)
            stack.callback(endpoint.terminate)
        print(f"endpoint queue {queue!r} on {app.broker_url if args.broker is None else 'the given broker'}")
        report = client_session(broker, queue)
        print("another client, by id:")
        report["later"] = another_client(broker, [report["first_id"], *report["batch_ids"][:2]])
        report["notebook"] = notebook_cell(broker, queue)
        print(f"inside a running loop: {report['notebook']}")
    return report


if __name__ == "__main__":
    main()

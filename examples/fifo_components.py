"""S6: stream components on a FIFO queue (the SQS front-end / back-end of the seed).

A front-end component consumes a FIFO queue in order. ``{"action": "forward", ...}`` messages go on to a
back-end component with 2 replicas pulling from its own queues; every other action is processed by the
front-end. Both store their results in one SQLite table. A ``Stop`` control message on the FIFO queue ends the
front-end, whose end-of-stream then ends every back-end replica. Components can also be bounded by a message
count and an idle timeout. The run's table is shown at the end, ordered by time::

    python examples/fifo_components.py                       # embedded broker
    python examples/fifo_components.py --broker sqs://...    # SQS (FIFO queue), e.g. moto on 127.0.0.1:9324
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from taskstream.brokers.base import Broker, broker_from_url
from taskstream.messages import Envelope
from taskstream.producer import Producer
from taskstream.stream_ops import Pipeline, QueueSource, RunResult, SQLiteSink, send_stop

COLUMNS = ["id", "seq", "component", "action", "result", "sent_at"]
ACTIONS = ("add", "multiply", "forward", "upper")


def frontend_process(message: dict[str, Any]) -> dict[str, Any]:
    """What the front-end does itself with every action but ``forward``."""
    action = message.get("action")
    a, b = message.get("a", 0), message.get("b", 0)
    if action == "add":
        result: Any = a + b
    elif action == "multiply":
        result = a * b
    elif action == "upper":
        result = str(message.get("text", "")).upper()
    else:
        result = f"unknown action {action!r}"
    return _row(message, "frontend", result)


async def backend_process(message: dict[str, Any]) -> dict[str, Any]:
    """The back-end's work on a forwarded message (async: it could call a remote service here)."""
    await asyncio.sleep(0)
    return _row(message, "backend", sum(range(int(message.get("n", 10)))))


def _row(message: dict[str, Any], component: str, result: Any) -> dict[str, Any]:
    return {
        "id": message["id"],
        "seq": message["seq"],
        "component": component,
        "action": message.get("action"),
        "result": str(result),
        "sent_at": message.get("sent_at"),
    }


def build_pipeline(
    *,
    queue: str = "s6-frontend.fifo",
    db: str | os.PathLike[str] = "out/fifo_components.db",
    replicas: int = 2,
    max_messages: int | None = None,
    idle_timeout: float | None = None,
    name: str = "fifo-components",
) -> Pipeline:
    """Front-end on ``queue`` (FIFO), back-end stage with ``replicas`` replicas, results in ``db``."""
    p = Pipeline(name)
    sink = SQLiteSink(db, "results", columns=COLUMNS, primary_key=["id"])
    messages = p.source("frontend", QueueSource(queue, max_items=max_messages, idle_timeout=idle_timeout))
    forward, other = messages.branch(lambda m: isinstance(m, dict) and m.get("action") == "forward", name="route")
    other.map(frontend_process, name="process").sink(sink)
    forward.stage("backend").map(backend_process, name="work").sink(sink)
    p.stage("backend").parallelism(replicas).bounded(idle_timeout=idle_timeout)
    return p


def make_messages(n: int) -> list[dict[str, Any]]:
    """``n`` messages cycling through the actions."""
    out = []
    for i in range(n):
        action = ACTIONS[i % len(ACTIONS)]
        out.append({"id": f"m{i:04d}", "seq": i, "action": action, "a": i, "b": 3, "text": f"msg {i}", "n": 100 + i})
    return out


async def send(broker: Broker, queue: str, messages: list[dict[str, Any]], *, stop: bool = True) -> None:
    """Publish messages in order on the FIFO queue (one message group), then a Stop."""
    await broker.declare(queue, fifo=queue.endswith(".fifo"))
    producer = Producer(broker)
    for message in messages:
        await producer.send(queue, Envelope(body={**message, "sent_at": time.time()}, key="s6"))
    if stop:
        await send_stop(broker, queue, key="s6")


def read_table(db: str | os.PathLike[str]) -> list[tuple[Any, ...]]:
    """The results table ordered by time of writing."""
    with contextlib.closing(sqlite3.connect(db)) as conn:  # `with sqlite3.connect()` alone does not close it
        return conn.execute(f"SELECT {', '.join(COLUMNS)} FROM results ORDER BY _ts, seq").fetchall()


async def run(broker_url: str, *, db: str, n: int = 24, queue: str = "s6-frontend.fifo") -> dict[str, list[RunResult]]:
    """Send ``n`` messages and a Stop, then run both components until they end."""
    Path(db).unlink(missing_ok=True)  # noqa: ASYNC240 - once, before the run
    broker = broker_from_url(broker_url)
    async with broker:
        await send(broker, queue, make_messages(n))
        return await build_pipeline(queue=queue, db=db).run_distributed(broker)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="memory://")
    parser.add_argument("--db", default="out/fifo_components.db")
    parser.add_argument("-n", type=int, default=24)
    args = parser.parse_args(argv)
    results = await run(args.broker, db=args.db, n=args.n)
    for stage, runs in results.items():
        for r in runs:
            print(f"{stage}[{r.replica}] ended by {r.ended_by}: {r.received} messages")
    print(f"{'seq':>4}  {'component':<9} {'action':<9} result")
    for row in read_table(args.db):
        print(f"{row[1]:>4}  {row[2]:<9} {row[3]:<9} {row[4]}")


if __name__ == "__main__":
    asyncio.run(main())

"""Task round trips on RabbitMQ: taskstream futures against a hand-written aio-pika RPC, same server, same run.

Both sides have a worker in its own process (started once, not timed) and a client here:

* taskstream: ``taskstream``'s worker runtime serving ``async def noop(i): return i`` (concurrency 64,
  prefetch 64) with the default result store for real brokers (a SQLite file: every task is recorded
  pending, running and success); the client submits with ``noop.submit(i)`` and awaits the futures, results
  coming back on its reply queue.
* baseline: the classic aio-pika RPC by hand: a server consuming the request queue (QoS 64, each message a
  task), publishing ``{"result": i}`` to ``reply_to`` with the correlation id (confirm awaited), then acking;
  a client publishing requests (confirms pipelined in gathers of 1,000) and resolving futures by correlation
  id from an exclusive reply queue. Persistent messages and durable request queues on both sides.

Workloads, alternating which side goes first each round:

* throughput: 5,000 no-op tasks, all submitted, then all awaited (tasks/s);
* latency: 200 tasks one after another, each awaited before the next (p50 and p99 in ms).

Needs RabbitMQ on 127.0.0.1:5672 (``BENCH_AMQP_URL`` elsewhere); ``BENCH_TASKS_N`` / ``BENCH_TASKS_SEQ`` change
the counts; ``BENCH_TASKS_STORE=memory`` runs the worker with the ``memory://`` result store instead of a fresh
SQLite file, to tell the store's cost from the path's. Each row also records the CPU time per task of the worker
process, of the client and of a local RabbitMQ server (``extra``): on a shared, noisy machine those figures
move far less than the rates.
Dramatiq's peer script (``peer_scripts/dramatiq_tasks.py``, RabbitMQ with Redis results, same counts) runs once per
round between the two sides, with the peers' venv of ``benchmarks/peers.py`` (``BENCH_TASKS_DRAMATIQ=/path/to/python``
for another interpreter with ``dramatiq[rabbitmq,redis]``, ``=0`` to leave it out): issue 15 compares taskstream's
throughput with Dramatiq's in the same rounds.
Targets (issue 15): throughput at least 2x Dramatiq's and at least the raw RPC's, p50 at most the raw RPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from common import Row, print_rows

from taskstream import App, Settings, gather
from taskstream.tasks import WorkerConfig

URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
N = int(os.environ.get("BENCH_TASKS_N", "5000"))
SEQUENTIAL = int(os.environ.get("BENCH_TASKS_SEQ", "200"))
CONCURRENCY = 64
PIPELINE = 1000
THROUGHPUT_TARGET = 1.0
LATENCY_TARGET = 1.0  # issue 15: p50 at most the hand-written RPC's
DRAMATIQ_TARGET = 2.0  # issue 15: throughput at least twice Dramatiq's
HERE = Path(__file__).resolve()
STORE = os.environ.get("BENCH_TASKS_STORE", "sqlite")  # "sqlite" (the default for real brokers) or "memory"
# an interpreter with dramatiq; "" (default): the peers' venv of benchmarks/peers.py; "0": Dramatiq not run
DRAMATIQ_PYTHON = os.environ.get("BENCH_TASKS_DRAMATIQ", "")


# -- the taskstream side -----------------------------------------------------------------------------


async def noop(i: int) -> int:
    return i


def taskstream_app(queue: str, *, worker: bool) -> App:
    app = App(URL, settings=Settings(concurrency=CONCURRENCY, prefetch=CONCURRENCY), workers=worker)
    app.task(queue=queue)(noop)
    if worker:
        app.tasks.enable_worker(WorkerConfig(queues=(queue,), concurrency=CONCURRENCY, max_processes=1))
    return app


async def taskstream_throughput(app: App, n: int) -> float:
    task = app.tasks.registry["noop"]
    started = time.perf_counter()
    futures = [task.submit(i) for i in range(n)]
    results = await gather(futures)
    elapsed = time.perf_counter() - started
    assert results == list(range(n))
    return n / elapsed


async def taskstream_latencies(app: App, n: int) -> list[float]:
    task = app.tasks.registry["noop"]
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        assert await task.submit(i) == i
        latencies.append(time.perf_counter() - started)
    return latencies


# -- the baseline: a hand-written aio-pika RPC --------------------------------------------------------


async def baseline_server(queue: str) -> None:
    connection = await aio_pika.connect_robust(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=CONCURRENCY)
    requests = await channel.declare_queue(queue, durable=True)

    async def handle(message: AbstractIncomingMessage) -> None:
        request = orjson.loads(message.body)
        result = await noop(*request["args"])
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps({"result": result}),
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
            ),
            routing_key=message.reply_to or "",
        )
        await message.ack()

    await requests.consume(handle)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await connection.close()


class BaselineClient:
    """Futures keyed by correlation id, resolved from an exclusive reply queue (aio-pika's RPC pattern)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.futures: dict[str, asyncio.Future[Any]] = {}

    async def __aenter__(self) -> BaselineClient:
        self.connection = await aio_pika.connect_robust(URL)
        self.channel = await self.connection.channel()
        await self.channel.declare_queue(self.queue, durable=True)
        self.replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.futures.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(orjson.loads(message.body)["result"])

    async def _publish(self, i: int, correlation_id: str) -> None:
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps({"task": "noop", "args": [i]}),
                correlation_id=correlation_id,
                reply_to=self.replies.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
            ),
            routing_key=self.queue,
        )

    def call(self, i: int) -> tuple[asyncio.Future[Any], Any]:
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures[correlation_id] = future
        return future, self._publish(i, correlation_id)


async def baseline_throughput(client: BaselineClient, n: int) -> float:
    started = time.perf_counter()
    futures: list[asyncio.Future[Any]] = []
    for first in range(0, n, PIPELINE):
        calls = [client.call(i) for i in range(first, min(n, first + PIPELINE))]
        futures.extend(f for f, _ in calls)
        await asyncio.gather(*(publish for _, publish in calls))
    results = await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    assert results == list(range(n))
    return n / elapsed


async def baseline_latencies(client: BaselineClient, n: int) -> list[float]:
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        future, publish = client.call(i)
        await publish
        assert await future == i
        latencies.append(time.perf_counter() - started)
    return latencies


# -- running ------------------------------------------------------------------------------------------


def _serve(kind: str, queue: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(HERE), f"--serve-{kind}", queue], env=env)


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux ``/proc``; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _broker_pid() -> int:
    """The local RabbitMQ server's process id (its Erlang VM), or 0 when it is not on this machine."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"beam.smp" in cmdline and b"rabbit" in cmdline:
            return int(entry.name)
    return 0


class CpuMeter:
    """Microseconds of CPU per task spent by a worker process, this (client) process and the local RabbitMQ."""

    def __init__(self, worker_pid: int, broker_pid: int) -> None:
        self.pids = (worker_pid, broker_pid)
        self._start = (0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float]:
        return _process_cpu(self.pids[0]), _own_cpu(), _process_cpu(self.pids[1]) if self.pids[1] else 0.0

    def start(self) -> None:
        self._start = self._now()

    def per_task(self, n: int) -> tuple[float, float, float]:
        """(worker, client, broker) microseconds per task since :meth:`start`."""
        now = self._now()
        worker, client, broker = (b - a for a, b in zip(self._start, now, strict=True))
        return worker * 1e6 / n, client * 1e6 / n, broker * 1e6 / n


async def one_round(
    ts_queue: str, raw_queue: str, taskstream_first: bool, pids: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    broker = _broker_pid()
    ts_cpu, raw_cpu = CpuMeter(pids[0], broker), CpuMeter(pids[1], broker)

    async def taskstream_side() -> None:
        async with taskstream_app(ts_queue, worker=False) as app:
            await taskstream_throughput(app, 200)  # warm-up: connections, reply queue, worker
            ts_cpu.start()
            out["ts_rate"] = await taskstream_throughput(app, N)
            out["ts_cpu"] = ts_cpu.per_task(N)
            out["ts_lat"] = await taskstream_latencies(app, SEQUENTIAL)

    async def baseline_side() -> None:
        async with BaselineClient(raw_queue) as client:
            await baseline_throughput(client, 200)
            raw_cpu.start()
            out["raw_rate"] = await baseline_throughput(client, N)
            out["raw_cpu"] = raw_cpu.per_task(N)
            out["raw_lat"] = await baseline_latencies(client, SEQUENTIAL)

    sides = [taskstream_side, baseline_side] if taskstream_first else [baseline_side, taskstream_side]
    for i, side in enumerate(sides):
        await side()
        if i == 0 and DRAMATIQ_PYTHON != "0":
            out["dramatiq"] = await asyncio.to_thread(dramatiq_round)
    return out


def dramatiq_round() -> dict[str, float]:
    """Dramatiq's throughput and p50 on the same server (its peer script, in its own interpreter)."""
    script = HERE.parent / "peer_scripts" / "dramatiq_tasks.py"
    if DRAMATIQ_PYTHON:
        python = DRAMATIQ_PYTHON
    else:
        from peers import peer_python

        python = str(peer_python())
    done = subprocess.run([python, str(script), str(N), str(SEQUENTIAL)], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the Dramatiq peer script failed:\n{done.stderr[-2000:]}")
    result: dict[str, float] = orjson.loads(lines[-1])
    return result


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(repeats: int = 3) -> list[Row]:
    """Round-trip throughput and latency of taskstream futures and the aio-pika RPC, ``repeats`` rounds."""
    stem = uuid.uuid4().hex[:8]
    ts_queue, raw_queue = f"bench-tasks-ts-{stem}", f"bench-tasks-raw-{stem}"
    with tempfile.TemporaryDirectory() as tmp:
        store = "memory://" if STORE == "memory" else f"sqlite:///{tmp}/results.sqlite3"
        env = dict(os.environ, TASKSTREAM_RESULT_STORE_URL=store)
        os.environ["TASKSTREAM_RESULT_STORE_URL"] = env["TASKSTREAM_RESULT_STORE_URL"]
        servers = [_serve("taskstream", ts_queue, env), _serve("baseline", raw_queue, env)]
        try:
            time.sleep(3.0)  # both workers connect and start consuming
            pids = (servers[0].pid, servers[1].pid)
            rounds = [asyncio.run(one_round(ts_queue, raw_queue, i % 2 == 0, pids)) for i in range(repeats)]
        finally:
            for server in servers:
                server.send_signal(signal.SIGTERM)
            for server in servers:
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
            os.environ.pop("TASKSTREAM_RESULT_STORE_URL", None)
            asyncio.run(_delete_queues([ts_queue, f"{ts_queue}.dlq", raw_queue]))
    ms = 1000.0
    rows = _dramatiq_rows(rounds)
    subject = f"taskstream futures (RabbitMQ, {'memory' if STORE == 'memory' else 'SQLite'} store)"
    cpu = {
        "cpu_us_per_task": {
            side: {
                "worker": statistics.median(r[f"{key}_cpu"][0] for r in rounds),
                "client": statistics.median(r[f"{key}_cpu"][1] for r in rounds),
                "rabbitmq": statistics.median(r[f"{key}_cpu"][2] for r in rounds),
            }
            for side, key in (("taskstream", "ts"), ("baseline", "raw"))
        }
    }
    return [
        *rows,
        Row(
            workload=f"tasks: {N} no-op submitted then awaited",
            subject=subject,
            baseline="hand-written aio-pika RPC",
            unit="tasks/s",
            values=[r["ts_rate"] for r in rounds],
            baseline_values=[r["raw_rate"] for r in rounds],
            higher_is_better=True,
            target=THROUGHPUT_TARGET,
            notes="worker in its own process on both sides; taskstream also records every task in its store",
            extra={"n": N, "concurrency": CONCURRENCY, "store": STORE, **cpu, **_dramatiq_medians(rounds)},
        ),
        Row(
            workload=f"tasks: {SEQUENTIAL} sequential, p50",
            subject=subject,
            baseline="hand-written aio-pika RPC",
            unit="ms",
            values=[_quantile(r["ts_lat"], 0.5) * ms for r in rounds],
            baseline_values=[_quantile(r["raw_lat"], 0.5) * ms for r in rounds],
            higher_is_better=False,
            target=LATENCY_TARGET,
            extra={"n": SEQUENTIAL},
        ),
        Row(
            workload=f"tasks: {SEQUENTIAL} sequential, p99",
            subject=subject,
            baseline="hand-written aio-pika RPC",
            unit="ms",
            values=[_quantile(r["ts_lat"], 0.99) * ms for r in rounds],
            baseline_values=[_quantile(r["raw_lat"], 0.99) * ms for r in rounds],
            higher_is_better=False,
            target=None,
            extra={"n": SEQUENTIAL},
        ),
    ]


def _dramatiq_rows(rounds: list[dict[str, Any]]) -> list[Row]:
    """Throughput and p50 against Dramatiq's, measured between the two sides of every round."""
    if not all("dramatiq" in r for r in rounds):
        return []
    subject = "taskstream futures (RabbitMQ, SQLite store)"
    baseline = "Dramatiq 2 (RabbitMQ, Redis results), same rounds"
    return [
        Row(
            workload=f"tasks: {N} no-op submitted then awaited, vs Dramatiq",
            subject=subject,
            baseline=baseline,
            unit="tasks/s",
            values=[r["ts_rate"] for r in rounds],
            baseline_values=[r["dramatiq"]["throughput"] for r in rounds],
            higher_is_better=True,
            target=DRAMATIQ_TARGET,
            extra={"n": N},
        ),
        Row(
            workload=f"tasks: {SEQUENTIAL} sequential, p50, vs Dramatiq",
            subject=subject,
            baseline=baseline,
            unit="ms",
            values=[_quantile(r["ts_lat"], 0.5) * 1000.0 for r in rounds],
            baseline_values=[r["dramatiq"]["p50_ms"] for r in rounds],
            higher_is_better=False,
            target=None,
            extra={"n": SEQUENTIAL},
        ),
    ]


def _dramatiq_medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [r["dramatiq"] for r in rounds if "dramatiq" in r]
    if not runs:
        return {}
    return {
        "dramatiq": {
            "throughput": statistics.median(r["throughput"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        }
    }


async def _delete_queues(names: list[str]) -> None:
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect_robust(URL)
        async with connection:
            channel = await connection.channel()
            for name in names:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name, if_unused=False, if_empty=False)


def _serve_main(kind: str, queue: str) -> None:
    if kind == "taskstream":
        taskstream_app(queue, worker=True).run()
    else:
        asyncio.run(baseline_server(queue))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-taskstream", metavar="QUEUE")
    parser.add_argument("--serve-baseline", metavar="QUEUE")
    args = parser.parse_args()
    if args.serve_taskstream:
        _serve_main("taskstream", args.serve_taskstream)
    elif args.serve_baseline:
        _serve_main("baseline", args.serve_baseline)
    else:
        rows = measure(int(os.environ.get("BENCH_REPEATS", "3")))
        print_rows(rows)
        for row in rows:
            print(f"  {row.workload}: taskstream {statistics.median(row.values):.2f} {row.unit}, ratio {row.ratio:.2f}")
        dramatiq = rows[0].extra.get("dramatiq")
        if dramatiq:
            ts_rate, ts_p50 = statistics.median(rows[0].values), statistics.median(rows[1].values)
            print(
                f"  Dramatiq (same run): {dramatiq['throughput']:.0f} tasks/s, p50 {dramatiq['p50_ms']:.2f} ms; "
                f"taskstream/Dramatiq throughput {ts_rate / dramatiq['throughput']:.2f}x"
            )
        for side, used in rows[0].extra["cpu_us_per_task"].items():
            print(
                f"  CPU per task, {side}: worker {used['worker']:.0f} us, client {used['client']:.0f} us, "
                f"RabbitMQ {used['rabbitmq']:.0f} us"
            )

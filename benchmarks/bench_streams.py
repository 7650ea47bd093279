"""S8 throughput: records per second through calibrate -> filter -> key_by -> 1 s event-time tumbling window
(count/mean/min/max per sensor), fused in one process on the memory broker.

Compared in the same run against:

* a hand-written asyncio pipeline with a bounded ``asyncio.Queue`` between stages (the way one writes it
  without a framework), and
* Bytewax, installed into its own venv under ``benchmarks/.peers/bytewax`` by this script (never a project
  dependency) and run as a subprocess on the same readings (``TestingSource(batch_size=1000)``).

Every contender gets the same pre-generated readings (generation is not timed) and must produce the same
number of windows. Run: ``python benchmarks/bench_streams.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/

from common import Row, machine_info, print_rows

N = int(os.environ.get("BENCH_STREAMS_N", "200000"))
SENSORS = 8
PEERS = Path(__file__).resolve().parent / ".peers"
BYTEWAX_VENV = PEERS / "bytewax"
BYTEWAX_SPEC = "bytewax==0.21.1"


# -- the workload (pure Python: also shipped to the Bytewax subprocess) --------------------------------


def make_readings(n: int, sensors: int = 8, seed: int = 7) -> list[dict[str, Any]]:
    """S8 readings: 1000 readings/s of event time, 5% out of order, 1% late, 1% bad."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        due = 1_700_000_000.0 + i / 1000.0
        u = rng.random()
        t = due - 3.0 if u < 0.01 else (due - rng.random() * 0.3 if u < 0.06 else due)
        value = None if rng.random() < 0.01 else 20.0 + (i % sensors) + rng.gauss(0.0, 0.5)
        out.append({"sensor": f"s{i % sensors}", "seq": i, "t": t, "value": value})
    return out


def calibrate(r: dict[str, Any]) -> dict[str, Any]:
    v = r["value"]
    return {"sensor": r["sensor"], "t": r["t"], "celsius": None if v is None else v * 1.02 - 0.3}


def valid(r: dict[str, Any]) -> bool:
    c = r["celsius"]
    return c is not None and -50.0 < c < 150.0


# -- taskstream ---------------------------------------------------------------------------------------


async def run_taskstream(readings: list[dict[str, Any]]) -> tuple[float, int]:
    from taskstream.stream_ops import CallbackSink, Count, EventClock, Max, Mean, Min, Pipeline, TumblingWindow

    windows = [0]

    def count(items: list[Any]) -> None:
        windows[0] += len(items)

    p = Pipeline("bench-s8")
    (
        p.source("sensor", readings)
        .map(calibrate)
        .filter(valid)
        .key_by(lambda r: r["sensor"])
        .window(TumblingWindow(1.0), EventClock("t", allowed_lateness=0.5))
        .aggregate(count=Count(), mean=Mean("celsius"), min=Min("celsius"), max=Max("celsius"))
        .sink(CallbackSink(count, per_batch=True))
    )
    started = time.perf_counter()
    await p.run("memory://")
    return time.perf_counter() - started, windows[0]


# -- hand-written asyncio baseline ---------------------------------------------------------------------

_END = object()


async def run_asyncio(readings: list[dict[str, Any]]) -> tuple[float, int]:
    """Stages as tasks joined by bounded queues, one record at a time."""
    q1: asyncio.Queue[Any] = asyncio.Queue(1000)
    q2: asyncio.Queue[Any] = asyncio.Queue(1000)
    q3: asyncio.Queue[Any] = asyncio.Queue(1000)
    q4: asyncio.Queue[Any] = asyncio.Queue(1000)
    windows = [0]

    async def source() -> None:
        for r in readings:
            await q1.put(r)
        await q1.put(_END)

    async def calibrate_stage() -> None:
        while (r := await q1.get()) is not _END:
            await q2.put(calibrate(r))
        await q2.put(_END)

    async def filter_stage() -> None:
        while (r := await q2.get()) is not _END:
            if valid(r):
                await q3.put(r)
        await q3.put(_END)

    async def window_stage() -> None:
        state: dict[str, tuple[float, dict[float, list[float]]]] = {}  # key -> (watermark, start -> acc)
        while (r := await q3.get()) is not _END:
            key = r["sensor"]
            wm, open_ = state.get(key, (-math.inf, {}))
            t = r["t"]
            start = math.floor(t)
            if start + 1.0 > wm:
                acc = open_.get(start)
                c = r["celsius"]
                if acc is None:
                    open_[start] = [1, c, c, c]
                else:
                    acc[0] += 1
                    acc[1] += c
                    acc[2] = min(acc[2], c)
                    acc[3] = max(acc[3], c)
            if t - 0.5 > wm:
                wm = t - 0.5
            for s in [s for s in open_ if s + 1.0 <= wm]:
                n, total, lo, hi = open_.pop(s)
                await q4.put((key, {"start": s, "count": n, "mean": total / n, "min": lo, "max": hi}))
            state[key] = (wm, open_)
        for key, (_wm, open_) in state.items():
            for s, (n, total, lo, hi) in sorted(open_.items()):
                await q4.put((key, {"start": s, "count": n, "mean": total / n, "min": lo, "max": hi}))
        await q4.put(_END)

    async def sink() -> None:
        while (await q4.get()) is not _END:
            windows[0] += 1

    started = time.perf_counter()
    await asyncio.gather(source(), calibrate_stage(), filter_stage(), window_stage(), sink())
    return time.perf_counter() - started, windows[0]


# -- Bytewax in its own venv ---------------------------------------------------------------------------

BYTEWAX_FLOW = """
import json, sys, time
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main


def builder():
    return [0, 0.0, None, None]


def folder(acc, r):
    c = r["celsius"]
    acc[0] += 1
    acc[1] += c
    acc[2] = c if acc[2] is None or c < acc[2] else acc[2]
    acc[3] = c if acc[3] is None or c > acc[3] else acc[3]
    return acc


def merger(a, b):
    return [a[0] + b[0], a[1] + b[1], min(a[2], b[2]), max(a[3], b[3])]


def main(n):
    readings = make_readings(n)
    flow = Dataflow("s8")
    stream = op.input("in", flow, TestingSource(readings, batch_size=1000))
    ok = op.filter("valid", op.map("calibrate", stream, calibrate), valid)
    keyed = op.key_on("by-sensor", ok, lambda r: r["sensor"])
    clock = win.EventClock(
        lambda r: datetime.fromtimestamp(r["t"], tz=timezone.utc), wait_for_system_duration=timedelta(seconds=0.5)
    )
    windower = win.TumblingWindower(length=timedelta(seconds=1), align_to=datetime(2023, 1, 1, tzinfo=timezone.utc))
    out = win.fold_window("stats", keyed, clock, windower, builder, folder, merger)
    results = []
    op.output("out", out.down, TestingSink(results))
    started = time.perf_counter()
    run_main(flow)
    print(json.dumps({"seconds": time.perf_counter() - started, "windows": len(results)}))


main(int(sys.argv[1]))
"""


def ensure_bytewax() -> Path | None:
    """Create ``benchmarks/.peers/bytewax`` and install Bytewax there (once). None if it cannot be had."""
    python = BYTEWAX_VENV / "bin" / "python"
    check = [str(python), "-c", "import bytewax.operators.windowing"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    try:
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(BYTEWAX_VENV)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", BYTEWAX_SPEC], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        print(f"bytewax could not be installed: {exc.stderr.decode(errors='replace')[-500:]}", file=sys.stderr)
        return None
    return python


def run_bytewax(python: Path, n: int) -> tuple[float, int]:
    source = "\n\n".join(inspect.getsource(f) for f in (make_readings, calibrate, valid))
    script = "import random\nfrom typing import Any\n\n" + source + "\n" + textwrap.dedent(BYTEWAX_FLOW)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        done = subprocess.run([str(python), path, str(n)], capture_output=True, text=True, timeout=900, check=True)
    finally:
        os.unlink(path)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), int(result["windows"])


# -- fused against a plain Python loop (json-parse, filter, 1 s tumbling count per sensor) ---------------


def make_lines(readings: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(r) for r in readings]


def plain_loop(lines: list[str]) -> tuple[float, int]:
    """The same work as :func:`run_counts`, written as one loop: parse, drop bad values, count per sensor and
    1 s window (event time, allowed lateness 0.5 s; a window closes when its sensor's watermark passes it)."""
    started = time.perf_counter()
    marks: dict[str, float] = {}
    open_: dict[str, dict[float, int]] = {}
    results = 0
    for line in lines:
        r = json.loads(line)
        if r["value"] is None:
            continue
        key, t = r["sensor"], r["t"]
        wm = marks.get(key, -math.inf)
        start = math.floor(t)
        windows = open_.setdefault(key, {})
        if start + 1.0 > wm:
            windows[start] = windows.get(start, 0) + 1
        if t - 0.5 > wm:
            marks[key] = wm = t - 0.5
            for s in [s for s in windows if s + 1.0 <= wm]:
                del windows[s]
                results += 1
    results += sum(len(w) for w in open_.values())
    return time.perf_counter() - started, results


async def run_counts(lines: list[str]) -> tuple[float, int]:
    from taskstream.stream_ops import CallbackSink, Count, EventClock, Pipeline, TumblingWindow

    windows = [0]

    def count(items: list[Any]) -> None:
        windows[0] += len(items)

    p = Pipeline("bench-counts")
    (
        p.source("lines", lines)
        .map(json.loads)
        .filter(lambda r: r["value"] is not None)
        .key_by(lambda r: r["sensor"])
        .window(TumblingWindow(1.0), EventClock("t", allowed_lateness=0.5))
        .aggregate(n=Count())
        .sink(CallbackSink(count, per_batch=True))
    )
    started = time.perf_counter()
    await p.run("memory://")
    return time.perf_counter() - started, windows[0]


def measure_loop(repeats: int) -> Row:
    lines = make_lines(make_readings(N, SENSORS))
    ts, loop, counts = [], [], set()
    for _ in range(repeats):
        seconds, n = asyncio.run(run_counts(lines))
        ts.append(N / seconds)
        counts.add(("taskstream", n))
        seconds, n = plain_loop(lines)
        loop.append(N / seconds)
        counts.add(("loop", n))
    return Row(
        workload="fused: json-parse, filter, 1 s tumbling count per sensor (records/s)",
        subject="taskstream fused pipeline",
        baseline="a plain Python loop doing the same work",
        unit="rec/s",
        values=ts,
        baseline_values=loop,
        target=0.8,
        extra={**machine_info(), "records": N, "windows": sorted(counts)},
    )


# -- S8 stage by stage (examples/sensor_windows.py) ---------------------------------------------------

RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
S8_COUNT = int(os.environ.get("BENCH_STREAMS_S8_COUNT", "40000"))  # readings of the in-process rows
# Readings of the stage-process rows: more, so that each process's start (CLI, connection, queue declarations,
# about 0.2 s of CPU each, timed) does not make most of the figure.
S8_PROC_COUNT = int(os.environ.get("BENCH_STREAMS_S8_PROC_COUNT", "200000"))
S8_REPLICAS = (1, 2, 3)


def _s8(db: str, replicas: int, name: str, count: int = S8_COUNT) -> Any:
    from examples.sensor_windows import build_pipeline

    return build_pipeline(db=db, count=count, replicas=replicas, name=name)


async def run_s8(url: str | None, replicas: int, count: int = S8_COUNT) -> tuple[float, Any]:
    """S8 fused (``url=None``, memory broker) or stage by stage on ``url``: (seconds, the result tables)."""
    from examples.sensor_windows import read_results

    from taskstream.brokers.base import broker_from_url

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "s8.db")
        name = f"bench-s8-{os.getpid()}-{time.monotonic_ns()}"
        p = _s8(db, replicas, name, count)
        if url is None:
            started = time.perf_counter()
            await p.run("memory://")
            return time.perf_counter() - started, read_results(db)
        broker = broker_from_url(url)
        await broker.connect()
        try:
            started = time.perf_counter()
            await p.run_distributed(broker, store="memory://", config=_config())
            seconds = time.perf_counter() - started
            for sp in p.plan().stages.values():
                for queue in [*sp.queues, p.plan().dead_letter_queue]:
                    try:
                        await broker.delete_queue(queue)
                    except Exception:  # best effort: a bench leaves no queues behind
                        pass
        finally:
            await broker.close()
        return seconds, read_results(db)


# A stage replica as its own ``taskstream pipeline run`` process. The child imports taskstream and the pipeline
# module, says "ready" and waits for "go" on stdin before calling the CLI, so that interpreter start-up and imports
# (the same in every row, and paid once per deployment) stay out of the timed part; connecting, declaring queues
# and restoring snapshots are timed.
_STAGE_CHILD = (
    "import sys, taskstream.cli, examples.sensor_windows\n"
    "from taskstream.brokers.rabbitmq import RabbitMQBroker\n"
    "from taskstream.brokers.zeromq import ZeroMQBroker\n"
    "import taskstream.deploy.cli, taskstream.observe.cli, taskstream.payloads.cli, taskstream.tasks.cli\n"
    "import taskstream.health, taskstream.stream_ops.cli, taskstream.config_check\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "taskstream.cli.main()"
)


def _stage_processes(url: str, replicas: int, db: str, state: str, name: str) -> list[subprocess.Popen[str]]:
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "TASKSTREAM_BROKER_URL": url,
        "TASKSTREAM_STATE_URL": f"sqlite:///{state}",
        "SENSOR_WINDOWS_DB": db,
        "SENSOR_WINDOWS_NAME": name,
        "SENSOR_WINDOWS_COUNT": str(S8_PROC_COUNT),
        "SENSOR_WINDOWS_REPLICAS": str(replicas),
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    stages = [("windows", i) for i in range(replicas)] + [("store", 0), ("sensor", 0)]
    procs = []
    for stage, replica in stages:
        cmd = [sys.executable, "-c", _STAGE_CHILD, "pipeline", "run", "examples.sensor_windows:pipeline"]
        cmd += ["--stage", stage, "--replica", str(replica), "--fresh"]
        procs.append(
            subprocess.Popen(
                cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def run_s8_processes(url: str, replicas: int) -> tuple[float, Any, float]:
    """S8 stage by stage on ``url``, every stage replica its own ``taskstream pipeline run`` process: (seconds,
    the result tables, CPU seconds of the stage processes). The CPU figure varies less than the wall time on a
    machine shared with other work."""
    from examples.sensor_windows import read_results

    with tempfile.TemporaryDirectory() as tmp:
        db, state = os.path.join(tmp, "s8.db"), os.path.join(tmp, "state.db")
        name = f"bench-s8p-{os.getpid()}-{time.monotonic_ns()}"
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        procs = _stage_processes(url, replicas, db, state, name)
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
            started = time.perf_counter()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            errors = [proc.communicate(timeout=600)[1] for proc in procs]
            seconds = time.perf_counter() - started
            labels = [f"windows/{i}" for i in range(replicas)] + ["store/0", "sensor/0"]  # _stage_processes' order
            failed = [(label, err[-2000:]) for label, p, err in zip(labels, procs, errors, strict=True) if p.returncode]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            asyncio.run(_delete_queues(url, name, replicas))
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
        if failed:
            raise RuntimeError(f"stage processes failed: {failed}")
        return seconds, read_results(db), cpu


async def _delete_queues(url: str, name: str, replicas: int) -> None:
    from taskstream.brokers.base import broker_from_url

    p = _s8(":memory:", replicas, name)
    async with broker_from_url(url) as broker:
        for queue in [q for sp in p.plan().stages.values() for q in sp.queues] + [p.plan().dead_letter_queue]:
            try:
                await broker.delete_queue(queue)
            except Exception:  # best effort: a bench leaves no queues behind
                pass


S8_MODES = {  # how the stage replicas run: label -> (runner, subject of the row)
    "stage processes": "every stage replica its own `taskstream pipeline run` process",
    "in-process": "run_distributed: every stage replica a consumer task of one process",
}


def measure_s8(repeats: int) -> list[Row]:
    """Distributed S8 over RabbitMQ and the ZeroMQ device, 1/2/3 window replicas, each stage replica its own
    process and (labelled so) all in one process, against fused in the same run."""
    from bench_zmq import start_device

    wanted = os.environ.get("BENCH_STREAMS_S8_BROKERS", "RabbitMQ,ZeroMQ device").split(",")  # which rows to run
    device, zmq_url = start_device()
    rows: list[Row] = []
    modes = [m for m in S8_MODES if m in os.environ.get("BENCH_STREAMS_S8_MODES", ",".join(S8_MODES)).split(",")]
    try:
        fused: dict[str, list[float]] = {}
        rates: dict[tuple[str, str, int], list[float]] = {}
        same: dict[tuple[str, str, int], bool] = {}
        cpu: dict[tuple[str, str, int], list[float]] = {}
        counts = {"in-process": S8_COUNT, "stage processes": S8_PROC_COUNT}
        for _ in range(repeats):
            for mode in modes:
                count = counts[mode]
                seconds, expected = asyncio.run(run_s8(None, 3, count))
                fused.setdefault(mode, []).append(count / seconds)
                for broker, url in (("RabbitMQ", RABBITMQ_URL), ("ZeroMQ device", zmq_url)):
                    if broker not in wanted:
                        continue
                    for replicas in S8_REPLICAS:
                        key = (broker, mode, replicas)
                        if mode == "in-process":
                            seconds, got = asyncio.run(run_s8(url, replicas))
                        else:
                            seconds, got, used = run_s8_processes(url, replicas)
                            cpu.setdefault(key, []).append(round(used / count * 1e6, 2))
                        rates.setdefault(key, []).append(count / seconds)
                        same[key] = same.get(key, True) and got == expected
        for (broker, mode, replicas), values in rates.items():
            key = (broker, mode, replicas)
            rows.append(
                Row(
                    workload=f"S8 stage by stage ({mode}), {broker}, {replicas} window replica(s) (readings/s)",
                    subject=f"taskstream {S8_MODES[mode]}",
                    baseline="the same pipeline fused, memory broker",
                    unit="rec/s",
                    values=values,
                    baseline_values=fused[mode],
                    target=0.4 if broker == "RabbitMQ" else None,
                    notes="" if same[key] else "RESULTS DIFFER FROM FUSED",
                    extra={
                        **machine_info(),
                        "readings": counts[mode],
                        "same_results": same[key],
                        "mode": mode,
                        "cpu_us_per_reading": cpu.get(key),  # stage processes: user + system CPU, all processes
                    },
                )
            )
    finally:
        device.stop()
    return rows


# -- measure -------------------------------------------------------------------------------------------


def measure(repeats: int = 3) -> list[Row]:
    readings = make_readings(N, SENSORS)
    ts_rates, base_rates, bw_rates = [], [], []
    windows: dict[str, set[int]] = {"taskstream": set(), "asyncio": set(), "bytewax": set()}
    python = ensure_bytewax()
    for _ in range(repeats):
        seconds, n = asyncio.run(run_taskstream(readings))
        ts_rates.append(N / seconds)
        windows["taskstream"].add(n)
        seconds, n = asyncio.run(run_asyncio(readings))
        base_rates.append(N / seconds)
        windows["asyncio"].add(n)
        if python is not None:
            seconds, n = run_bytewax(python, N)
            bw_rates.append(N / seconds)
            windows["bytewax"].add(n)
    info = {**machine_info(), "records": N, "sensors": SENSORS, "windows": {k: sorted(v) for k, v in windows.items()}}
    rows = [
        Row(
            workload="S8 fused, memory (records/s)",
            subject="taskstream fused pipeline",
            baseline="hand-written asyncio, queues between stages",
            unit="rec/s",
            values=ts_rates,
            baseline_values=base_rates,
            target=1.0,
            extra=info,
        )
    ]
    if bw_rates:
        rows.append(
            Row(
                workload="S8 fused, memory (records/s)",
                subject="taskstream fused pipeline",
                baseline=f"Bytewax {BYTEWAX_SPEC.split('==')[1]} (run_main, batch 1000)",
                unit="rec/s",
                values=ts_rates,
                baseline_values=bw_rates,
                target=1.0,
                extra=info,
            )
        )
    rows.append(measure_loop(repeats))
    if os.environ.get("BENCH_STREAMS_S8", "1") != "0":
        rows.extend(measure_s8(repeats))
    return rows


def _config() -> Any:
    from taskstream.stream_ops.runner import RunConfig

    if os.environ.get("BENCH_BS"):
        return RunConfig(
            batch_size=int(os.environ["BENCH_BS"]),
            linger=float(os.environ.get("BENCH_LINGER", "0.005")),
            prefetch=int(os.environ.get("BENCH_PREFETCH", "0")) or None,
        )
    return None


if __name__ == "__main__":
    rows = measure(int(os.environ.get("BENCH_REPEATS", "3")))
    print_rows(rows)
    print(json.dumps(rows[0].extra["windows"]))

"""Prometheus metrics: read over HTTP from real ``taskstream run``, ``worker`` and ``pipeline run`` processes on
RabbitMQ after known traffic (successes, retries, dead letters of every reason class), counts checked exactly;
and in-process on the memory broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from taskstream import App
from taskstream.brokers.base import broker_from_url
from taskstream.errors import ConfigurationError
from taskstream.health import HealthServer
from taskstream.observe.metrics import METRICS, NOOP, PrometheusRecorder, reason_class, recorder_for
from taskstream.settings import Settings
from tests.support.ports import free_port
from tests.support.queues import delete_queues
from tests.support.waiting import wait_for

AMQP = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def fetch(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


async def scrape(port: int) -> Samples:
    status, text = await asyncio.to_thread(fetch, port)
    return parse(text) if status == 200 else {}


@contextlib.contextmanager
def cli(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A ``taskstream`` process; SIGTERM on leaving, and it must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskstream.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]


async def wait_ready(port: int, proc: subprocess.Popen[str]) -> None:
    async def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(
                f"the process exited with {proc.returncode}: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
            )
        return (await asyncio.to_thread(fetch, port, "/readyz"))[0] == 200

    await wait_for(ready, what="/readyz to answer 200", timeout=60)


RUN_MODULE = """
import os
from taskstream import App
from taskstream.errors import Reject

app = App()
QUEUE = os.environ["OBS_QUEUE"]

@app.consumer(QUEUE, publish_to=QUEUE + ".out", max_attempts=2)
def price(order: dict[str, int]) -> dict[str, int]:
    if order["n"] == 13:
        raise KeyError("no price for 13")
    if order["n"] == 7:
        raise Reject("7 is not sold")
    return {"n": order["n"], "price": 10 * order["n"]}
"""


@pytest.mark.rabbitmq
async def test_taskstream_run_serves_exact_counts(tmp_path: Path) -> None:
    (tmp_path / "obs_run.py").write_text(RUN_MODULE)
    queue = f"obs-run-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"OBS_QUEUE": queue, "TASKSTREAM_BROKER_URL": AMQP}
    args = ["run", "obs_run:app", "--health-port", str(port), "--health-host", "127.0.0.1"]
    try:
        with cli(args, tmp_path, env) as proc:
            await wait_ready(port, proc)
            broker = broker_from_url(AMQP)
            async with broker:
                bodies = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 7}', b'{"n": 13}', b"not json", b'{"n": "x"}']
                for i, body in enumerate(bodies):
                    await broker.publish(queue, body, headers={}, message_id=f"m{i}")

            async def settled() -> Samples | None:
                samples = await scrape(port)
                dead = sum(v for (n, _), v in samples.items() if n == "taskstream_messages_dead_lettered_total")
                done = value(samples, "taskstream_messages_handled_total", queue=queue) == 3 and dead == 4
                return samples if done and value(samples, "taskstream_dead_letter_depth", queue=queue) == 4 else None

            samples = await wait_for(settled, what="3 handled, 4 dead letters, dead-letter depth 4", timeout=90)
    finally:
        await delete_queues(AMQP, queue, f"{queue}.out")

    assert value(samples, "taskstream_messages_received_total", queue=queue) == 8  # 13 came twice
    assert value(samples, "taskstream_messages_handled_total", queue=queue) == 3
    assert value(samples, "taskstream_messages_retried_total", queue=queue) == 1
    for reason in ("failed", "rejected", "malformed", "invalid"):
        assert value(samples, "taskstream_messages_dead_lettered_total", queue=queue, reason=reason) == 1, reason
    assert value(samples, "taskstream_handler_duration_seconds_count", queue=queue) == 3
    assert value(samples, "taskstream_messages_published_total", queue=f"{queue}.out") == 3
    assert value(samples, "taskstream_publish_duration_seconds_count", queue=f"{queue}.out") == 3
    assert value(samples, "taskstream_messages_in_flight", queue=queue) == 0
    assert value(samples, "taskstream_queue_depth", queue=queue) == 0


WORKER_MODULE = """
import os
from taskstream import App

app = App()
QUEUE = os.environ["OBS_QUEUE"]

@app.task(queue=QUEUE)
def square(n: int) -> int:
    return n * n

@app.task(queue=QUEUE, retries=1, retry_delay=0.1)
def boom(n: int) -> int:
    raise ValueError(f"boom {n}")
"""


@pytest.mark.rabbitmq
async def test_taskstream_worker_serves_exact_task_counts(tmp_path: Path) -> None:
    (tmp_path / "obs_worker.py").write_text(WORKER_MODULE)
    queue = f"obs-tasks-{uuid.uuid4().hex[:8]}"
    store = f"sqlite:///{tmp_path / 'results.db'}"
    port = free_port()
    env = {"OBS_QUEUE": queue, "TASKSTREAM_BROKER_URL": AMQP, "TASKSTREAM_RESULT_STORE_URL": store}
    args = ["worker", "obs_worker:app", "--health-port", str(port), "--health-host", "127.0.0.1"]
    registry = CollectorRegistry()
    client = App(AMQP, workers=False, result_store=store, metrics=registry)
    square, boom = client.remote("square", queue=queue), client.remote("boom", queue=queue, retries=1)
    try:
        with cli(args, tmp_path, env) as proc:
            await wait_ready(port, proc)
            async with client:
                results = await asyncio.gather(*(square.submit(n) for n in (2, 3, 4)))
                assert results == [4, 9, 16]
                with pytest.raises(Exception, match="boom 5"):
                    await boom.submit(5)

            async def settled() -> Samples | None:
                samples = await scrape(port)
                return samples if value(samples, "taskstream_messages_handled_total", queue=queue) == 4 else None

            samples = await wait_for(settled, what="4 task messages handled", timeout=60)
    finally:
        await delete_queues(AMQP, queue)

    assert value(samples, "taskstream_tasks_finished_total", task="square", status="success") == 3
    assert value(samples, "taskstream_tasks_finished_total", task="boom", status="failed") == 1
    assert value(samples, "taskstream_task_run_seconds_count", task="square") == 3
    assert value(samples, "taskstream_messages_received_total", queue=queue) == 5  # boom ran twice
    assert value(samples, "taskstream_messages_retried_total", queue=queue) == 1
    assert not any(n == "taskstream_messages_dead_lettered_total" for n, _ in samples)
    mine = parse(generate_latest(registry).decode())
    assert value(mine, "taskstream_tasks_submitted_total", task="square") == 3
    assert value(mine, "taskstream_tasks_submitted_total", task="boom") == 1
    assert value(mine, "taskstream_messages_published_total", queue=queue) >= 1  # batched on the wire


PIPELINE_MODULE = """
import os
from taskstream.stream_ops import Pipeline, QueueSink, QueueSource

p = Pipeline(os.environ["OBS_PIPELINE"])
(p.source("numbers", QueueSource(os.environ["OBS_IN"]))
  .map(lambda n: n * 2)
  .filter(lambda n: n % 4 == 0)
  .sink(QueueSink(os.environ["OBS_OUT"])))
"""


@pytest.mark.rabbitmq
async def test_pipeline_stage_serves_step_counts(tmp_path: Path) -> None:
    """``taskstream pipeline run --stage numbers --health-port``: its /metrics after 20 numbers and 1 bad one."""
    (tmp_path / "obs_pipe.py").write_text(PIPELINE_MODULE)
    name = f"obs-pipe-{uuid.uuid4().hex[:8]}"
    source_queue, out = f"{name}-in", f"{name}-out"
    env = {"OBS_PIPELINE": name, "OBS_IN": source_queue, "OBS_OUT": out, "TASKSTREAM_BROKER_URL": AMQP}
    port = free_port()
    args = ["pipeline", "run", "obs_pipe:p", "--stage", "numbers", "--state", f"sqlite:///{tmp_path / 's.db'}"]
    try:
        with cli([*args, "--health-port", str(port), "--health-host", "127.0.0.1"], tmp_path, env) as proc:
            await wait_ready(port, proc)
            broker = broker_from_url(AMQP)
            async with broker:
                await broker.declare(source_queue)
                for n in range(20):
                    await broker.publish(source_queue, str(n).encode(), headers={}, message_id=f"n{n}")
                await broker.publish(source_queue, b"{not json", headers={}, message_id="bad")

            async def counted() -> Samples | None:
                found = await scrape(port)
                step = _step(found, name, "filter")
                out_count = value(
                    found, "taskstream_stream_records_out_total", pipeline=name, stage="numbers", step=step
                )
                dead = value(found, "taskstream_messages_dead_lettered_total", queue=source_queue, reason="malformed")
                return found if out_count == 10 and dead == 1 else None

            samples = await wait_for(counted, what="the stage to pass 10 of 20 records", timeout=90)
    finally:
        await delete_queues(AMQP, source_queue, out)
    step = _step(samples, name, "filter")
    assert value(samples, "taskstream_stream_records_in_total", pipeline=name, stage="numbers", step=step) == 20
    assert value(samples, "taskstream_stream_records_out_total", pipeline=name, stage="numbers", step=step) == 10
    assert value(samples, "taskstream_messages_received_total", queue=source_queue) == 21
    assert value(samples, "taskstream_stream_late_records_total", pipeline=name, stage="numbers", step=step) == 0


def _step(samples: Samples, pipeline: str, kind: str) -> str:
    for (name, labels), _ in samples.items():
        found = dict(labels)
        if name == "taskstream_stream_records_in_total" and found.get("pipeline") == pipeline and kind in found["step"]:
            return found["step"]
    return ""


# -- in process, memory broker ------------------------------------------------------------------------


@pytest.mark.memory
async def test_app_metrics_in_process_and_served_beside_health() -> None:
    registry = CollectorRegistry()
    app = App(f"memory://metrics-{uuid.uuid4().hex[:6]}", metrics=registry, settings=Settings(max_message_bytes=1000))

    @app.consumer("m.in", max_attempts=1)
    def handle(n: int) -> None:
        if n < 0:
            raise ValueError("negative")

    async with HealthServer(app, port=0, host="127.0.0.1") as server, app:
        for n in (1, 2, -1):
            await app.publish("m.in", n)
        await app.broker.publish("m.in", b"1" * 1001, headers={}, message_id="big")

        async def done() -> Samples | None:
            samples = await scrape(server.port)
            dead = sum(v for (n, _), v in samples.items() if n == "taskstream_messages_dead_lettered_total")
            return samples if dead == 2 and value(samples, "taskstream_messages_handled_total", queue="m.in") else None

        samples = await wait_for(done, what="two dead letters")
    assert value(samples, "taskstream_messages_received_total", queue="m.in") == 4
    assert value(samples, "taskstream_messages_handled_total", queue="m.in") == 2
    assert value(samples, "taskstream_messages_dead_lettered_total", queue="m.in", reason="failed") == 1
    assert value(samples, "taskstream_messages_dead_lettered_total", queue="m.in", reason="too_large") == 1


@pytest.mark.memory
async def test_metrics_off_costs_nothing_and_says_so() -> None:
    app = App(f"memory://metrics-off-{uuid.uuid4().hex[:6]}")
    assert app.metrics is NOOP and recorder_for(app.broker) is NOOP
    async with HealthServer(app, port=0, host="127.0.0.1") as server:
        status, body = await asyncio.to_thread(fetch, server.port, "/metrics")
    assert status == 404 and "metrics are off" in body
    with pytest.raises(ConfigurationError, match="metrics must be True, False"):
        App("memory://metrics-bad", metrics="yes")  # type: ignore[arg-type]


def test_reason_classes_and_names_follow_conventions() -> None:
    assert reason_class("message of 9 bytes is over the limit of 8 bytes") == "too_large"
    assert reason_class("payload unavailable: gone") == "payload"
    assert reason_class("ValidationFailed: body does not match") == "invalid"
    assert reason_class("something else") == "other"
    for name, (kind, _, _) in METRICS.items():
        assert name.startswith("taskstream_")
        assert name.endswith("_total") == (kind == "counter"), name


def _without_created(samples: Samples) -> Samples:
    return {key: v for key, v in samples.items() if not key[0].endswith("_created")}


def test_recorded_histograms_export_as_prometheus_client_histograms_do() -> None:
    """Plain bucket counts give the same samples as ``prometheus_client.Histogram``, bounds included."""
    recorder = PrometheusRecorder(CollectorRegistry())
    reference_registry = CollectorRegistry()
    _, labels, doc = METRICS["taskstream_task_run_seconds"]
    reference = Histogram("taskstream_task_run_seconds", doc, labels, registry=reference_registry)
    runs = (0.0, 0.001, 0.005, 0.0050001, 0.01, 0.3, 1.0, 7.5, 10.0, 10.5, 1e9, -2.0)
    for seconds in runs:
        recorder.task_finished("square", "success", seconds)
        reference.labels("square").observe(max(0.0, seconds))
    recorder.task_finished("boom", "failed", None)
    mine = _without_created(parse(generate_latest(recorder.registry).decode()))
    expected = _without_created(parse(generate_latest(reference_registry).decode()))
    assert {k: v for k, v in mine.items() if k[0].startswith("taskstream_task_run_seconds")} == expected
    assert value(mine, "taskstream_task_run_seconds_bucket", task="square", le="0.005") == 4  # -2.0 counts as 0.0
    assert value(mine, "taskstream_tasks_finished_total", task="square", status="success") == len(runs)
    assert value(mine, "taskstream_tasks_finished_total", task="boom", status="failed") == 1
    assert not any(k[0] == "taskstream_task_run_seconds_count" and ("task", "boom") in k[1] for k in mine)


def test_tasks_submitted_from_many_threads_add_up_exactly() -> None:
    recorder = PrometheusRecorder(CollectorRegistry())
    start = threading.Barrier(4)

    def submit() -> None:
        start.wait()
        for _ in range(5_000):
            recorder.tasks_submitted("square")
        recorder.tasks_submitted("cube", 3)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = parse(generate_latest(recorder.registry).decode())
    assert value(samples, "taskstream_tasks_submitted_total", task="square") == 20_000
    assert value(samples, "taskstream_tasks_submitted_total", task="cube") == 12
    assert sum(1 for name, _ in samples if name == "taskstream_tasks_submitted_total") == 2


def test_negative_counts_and_a_second_recorder_on_a_registry_are_refused() -> None:
    registry = CollectorRegistry()
    recorder = PrometheusRecorder(registry)
    with pytest.raises(ValueError, match="published\\(\\) must be a count of zero or more, not -1"):
        recorder.published("orders", -1, recorder.timer())
    with pytest.raises(ValueError, match="tasks_submitted"):
        recorder.tasks_submitted("square", -2)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PrometheusRecorder(registry)

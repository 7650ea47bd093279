"""The web console over HTTP (no browser): guards, secrets, tasks by id, pipelines, metrics rates, CLI errors.

The console runs in this process (``build_console`` on aiohttp's test server) against the embedded broker or
RabbitMQ; ``test_console_browser.py`` drives ``taskstream console`` in Debian's chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from taskstream import App
from taskstream.brokers.base import broker_from_url
from taskstream.observe.console import ConsoleConfig, build_console, config_for
from taskstream.observe.console.promtext import parse_samples, queue_counters, step_counters
from taskstream.observe.console.sampler import Series
from taskstream.stream_ops import CallbackSink, Pipeline
from tests.brokers.contract.backends.rabbitmq import URL as AMQP_URL
from tests.support.waiting import wait_for
from tests.tasks.conftest import quick_settings

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def serve(config: ConsoleConfig) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = TestClient(TestServer(build_console(config)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def hub() -> str:
    return f"memory://console-{uuid.uuid4().hex[:8]}"


async def state(client: TestClient[web.Request, web.Application]) -> dict[str, Any]:
    response = await client.get("/api/state")
    assert response.status == 200
    data: dict[str, Any] = await response.json()
    return data


@pytest.mark.memory
async def test_changes_need_the_consoles_own_origin_and_host() -> None:
    url = hub()
    async with broker_from_url(url) as broker:
        await broker.declare("orders")
        await broker.declare("orders.dlq")
        await broker.publish("orders.dlq", b'{"n": 1}', headers={"x-death-reason": "KeyError: 1"}, message_id="m1")
        async with serve(config_for(url, queues=["orders"], refresh=0.2)) as client:
            origin = str(client.make_url("/").origin())
            purge = "/queues/orders/dead-letters/purge"

            refused = await client.post(purge, allow_redirects=False)
            assert refused.status == 403 and "no Origin or Referer" in await refused.text()
            refused = await client.post(purge, headers={"Origin": "http://evil.example"}, allow_redirects=False)
            assert refused.status == 403 and "is not the console's" in await refused.text()
            refused = await client.post(
                purge, headers={"Origin": origin, "Sec-Fetch-Site": "cross-site"}, allow_redirects=False
            )
            assert refused.status == 403 and "Sec-Fetch-Site" in await refused.text()
            rebound = await client.get("/", headers={"Host": "evil.example"})
            assert rebound.status == 421 and "evil.example" in await rebound.text()
            assert await broker.depth("orders.dlq") == 1

            page = await client.get("/queues/orders/dead-letters")
            assert (
                page.headers["X-Frame-Options"] == "DENY"
                and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
            )
            text = await page.text()
            assert "KeyError: 1" in text and 'value="m1"' in text

            done = await client.post(purge, headers={"Origin": origin}, allow_redirects=False)
            assert done.status == 303 and done.headers["Location"] == "/queues/orders/dead-letters"
            assert await broker.depth("orders.dlq") == 0
            after = await (await client.get(done.headers["Location"])).text()
            assert "Purged the dead-letter queue (1 message(s) before)." in after

            missing = await client.get("/queues/nope/dead-letters")
            assert missing.status == 404 and "does not show a queue named 'nope'" in await missing.text()
            too_long = await client.post(
                "/queues/orders/dead-letters/replay", data={"id": "x" * 300}, headers={"Origin": origin}
            )
            assert too_long.status == 400 and "bad message id" in await too_long.text()


@pytest.mark.rabbitmq
@pytest.mark.redis
async def test_secrets_never_appear_on_a_page() -> None:
    config = config_for(
        AMQP_URL,
        queues=[f"console-secret-{uuid.uuid4().hex[:8]}"],
        result_store_url="redis://:hunter2secret@127.0.0.1:6379/0",
        metrics_urls=("http://scraper:metricsecret@127.0.0.1:9/metrics",),
        refresh=0.2,
    )
    async with serve(config) as client:
        await wait_for(lambda: state(client), what="a sample")
        await wait_for(
            lambda: _metrics_error(client), what="the metrics endpoint's error on the page (nothing listens on :9)"
        )
        for path in ("/", "/api/state", "/tasks", "/tasks/some-task", "/api/tasks/some-task"):
            text = await (await client.get(path)).text()
            assert "hunter2secret" not in text and "metricsecret" not in text, path
        shown = await state(client)
        assert "scraper:***@127.0.0.1:9" in shown["metrics_error"]
        assert "guest:***@127.0.0.1" in await (await client.get("/")).text()


async def _metrics_error(client: TestClient[web.Request, web.Application]) -> Any:
    return (await state(client))["metrics_error"]


@pytest.mark.rabbitmq
async def test_tasks_by_id_show_status_timings_results_and_tracebacks(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    queue = f"console-tasks-{uuid.uuid4().hex[:8]}"
    app = App(broker=AMQP_URL, settings=quick_settings(), result_store=store, workers=True)

    @app.task(queue=queue, retries=0)
    def price(item: str) -> dict[str, float]:
        if item == "unknown":
            raise LookupError(f"no price for {item!r}")
        return {"price": 2.5}

    try:
        async with app:
            good = price.submit("apple")
            bad = price.submit("unknown")
            assert await good == {"price": 2.5}
            with pytest.raises(Exception, match="no price for 'unknown'"):
                await bad
        async with serve(config_for(AMQP_URL, queues=[queue], result_store_url=store)) as client:
            failed = await (await client.get(f"/tasks/{bad.task_id}")).text()
            assert "status-failed" in failed and "LookupError" in failed and "no price for" in failed
            assert 'raise LookupError(f"no price for {item!r}")' in failed.replace("&#34;", '"').replace("&#39;", "'")
            assert "ran " in failed and "attempts" in failed

            succeeded = await (await client.get(f"/tasks/{good.task_id}")).text()
            assert "status-success" in succeeded and "2.5" in succeeded
            record = await (await client.get(f"/api/tasks/{good.task_id}")).json()
            assert record["status"] == "success" and record["result"] == {"price": 2.5} and record["ran"] >= 0

            lookup = await client.get("/tasks", params={"id": bad.task_id}, allow_redirects=False)
            assert lookup.status == 303 and lookup.headers["Location"] == f"/tasks/{bad.task_id}"
            recent = await (await client.get("/tasks")).text()
            assert good.task_id in recent and bad.task_id in recent
            unknown = await client.get("/api/tasks/no-such-task")
            assert unknown.status == 404 and "No task 'no-such-task'" in (await unknown.json())["error"]
    finally:
        async with broker_from_url(AMQP_URL) as broker:
            for name in (queue, f"{queue}.dlq"):
                with contextlib.suppress(Exception):
                    await broker.delete_queue(name)


def sensors(name: str) -> Pipeline:
    pipeline = Pipeline(name)
    pipeline.source("numbers", range(10)).stage("doubled").map(lambda n: n * 2).sink(CallbackSink(lambda v: None))
    pipeline.stage("doubled").parallelism(2)
    return pipeline


@pytest.mark.memory
async def test_a_pipeline_page_draws_the_graph_and_adds_up_its_replicas() -> None:
    url, name = hub(), f"p{uuid.uuid4().hex[:6]}"
    pipeline = sensors(name)
    async with broker_from_url(url) as broker:
        for replica, count in ((0, 3), (1, 2)):
            queue = f"{name}-doubled-{replica}"
            await broker.declare(queue)
            for n in range(count):
                await broker.publish(queue, b"{}", message_id=f"{replica}-{n}")
        async with serve(config_for(url, pipelines=[pipeline], refresh=0.2)) as client:
            figures = await wait_for(
                lambda: _stage(client, name, "doubled"), what="the doubled stage's summed depth of 5"
            )
            assert figures["depth"] == 5
            page = await (await client.get(f"/pipelines/{name}")).text()
            assert f"{name}-doubled-0, {name}-doubled-1" in page and "(source)" in page
            graph = await client.get(f"/pipelines/{name}/graph.svg")
            assert graph.content_type == "image/svg+xml" and b"<svg" in await graph.read()
            missing = await client.get("/pipelines/nope")
            assert missing.status == 404 and f"it shows: {name}" in await missing.text()


async def _stage(client: TestClient[web.Request, web.Application], pipeline: str, stage: str) -> Any:
    figures = (await state(client))["pipelines"][pipeline][stage]
    return figures if figures["depth"] == 5 else None


@pytest.mark.memory
async def test_rates_come_from_a_metrics_endpoint() -> None:
    scrapes = 0

    async def metrics(request: web.Request) -> web.Response:
        nonlocal scrapes
        scrapes += 1
        handled = 10 * scrapes
        body = (
            "# TYPE taskstream_messages_handled_total counter\n"
            f'taskstream_messages_handled_total{{queue="orders"}} {handled}\n'
            f'taskstream_stream_records_in_total{{pipeline="{name}",stage="doubled",step="map-3"}} {handled}\n'
        )
        return web.Response(text=body)

    endpoint = web.Application()
    endpoint.router.add_get("/metrics", metrics)
    url, name = hub(), f"p{uuid.uuid4().hex[:6]}"
    async with TestServer(endpoint) as server:
        config = config_for(
            url,
            queues=["orders"],
            pipelines=[sensors(name)],
            metrics_urls=(str(server.make_url("/metrics")),),
            refresh=0.2,
        )
        async with serve(config) as client:
            rates = await wait_for(lambda: _handled_rate(client), what="a handled rate from the counters")
            assert rates["queue"] > 0
            assert (await state(client))["pipelines"][name]["doubled"]["rates"]["records_in"] > 0


async def _handled_rate(client: TestClient[web.Request, web.Application]) -> dict[str, float] | None:
    shown = await state(client)
    rate = shown["queues"]["orders"]["rates"].get("messages_handled")
    return {"queue": rate} if rate else None


def test_prometheus_text_is_read_per_queue_and_per_step() -> None:
    text = (
        "# HELP taskstream_messages_received_total Deliveries.\n"
        'taskstream_messages_received_total{queue="a"} 3.0\n'
        'taskstream_messages_dead_lettered_total{queue="a",reason="failed"} 1\n'
        'taskstream_messages_dead_lettered_total{queue="a",reason="malformed"} 2\n'
        'taskstream_messages_received_total{queue="b \\"q\\""} 4 1700000000000\n'
        'taskstream_messages_in_flight{queue="a"} 7\n'
        'other_total{queue="a"} 9\n'
        'taskstream_stream_records_out_total{pipeline="p",stage="s",step="map"} 5\n'
        "not a sample line\n"
    )
    assert queue_counters(text) == {
        "a": {"messages_received": 3.0, "messages_dead_lettered": 3.0},
        'b "q"': {"messages_received": 4.0},
    }
    assert step_counters(text) == {("p", "s", "map"): {"records_out": 5.0}}
    assert len(parse_samples(text)) == 7


def test_rates_follow_the_samples() -> None:
    depth = Series()
    for at, value in ((0.0, 10.0), (1.0, 12.0), (2.0, 16.0)):
        depth.add(at, value)
    assert depth.rate() == 3.0
    counter = Series()
    for at, value in ((0.0, 100.0), (1.0, 110.0), (2.0, 4.0)):  # restarted between the last two samples
        counter.add(at, value)
    assert counter.rate(counter=True) == 7.0
    assert Series().rate() is None


async def taskstream(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskstream.cli",
        "console",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.memory
async def test_the_command_says_what_was_wrong() -> None:
    code, err = await taskstream("--broker", "memory://")
    assert code == 2 and "no queues to show: give --app, --pipeline or --queue" in err
    code, err = await taskstream("--broker", "memory://", "--queue", "q", "--port", "70000")
    assert code == 2 and "--port must be between 0 and 65535, got 70000" in err
    code, err = await taskstream("--broker", "memory://", "--app", "tests.observe.cli_app:nothing")
    assert code == 2 and "has no attribute 'nothing'" in err
    code, err = await taskstream("--broker", "nope://x", "--queue", "q")
    assert code == 2 and "--broker: unknown broker URL scheme 'nope'" in err

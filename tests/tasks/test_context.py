"""The task runtime and App components get an ``AppContext``, never the App; ``@app.task``'s keywords."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import taskstream
from taskstream.context import AppContext
from taskstream.errors import ConfigurationError
from taskstream.observe.metrics import resolve
from taskstream.producer import Producer
from taskstream.stream_ops.service import Service, ServiceClient
from taskstream.tasks import TaskOptions
from taskstream.tasks.runtime import TaskRuntime
from taskstream.tasks.worker import TaskWorker
from tests.brokers.contract.backends import BackendSpec
from tests.tasks import library
from tests.tasks.conftest import TaskEnv, quick_settings


async def test_a_runtime_runs_tasks_on_a_context_without_an_app(
    backend: BackendSpec, env: TaskEnv, tmp_path: Path
) -> None:
    broker = backend.make()
    settings = quick_settings()
    runtime: TaskRuntime | None = None

    async def start() -> None:
        await broker.connect()
        assert runtime is not None
        await runtime.start(context)

    async def stop() -> None:
        assert runtime is not None
        await runtime.stop()
        await broker.close()

    context = AppContext(
        broker=broker,
        producer=Producer(broker, max_message_bytes=settings.max_message_bytes),
        settings=settings,
        metrics=resolve(False),
        result_store=f"sqlite:///{tmp_path / 'results.sqlite3'}",
        start=start,
        stop=stop,
    )
    runtime = TaskRuntime(context, workers=True)
    queue = env.queue()
    add = runtime.register(library.add, None, TaskOptions(queue=queue))
    await start()
    try:
        assert isinstance(runtime.worker, TaskWorker) and runtime.worker.context is context
        future = add.submit(2, 3)
        assert await asyncio.wait_for(asyncio.wrap_future(future), 60) == 5
        assert runtime.get_task(future.task_id).status == "success"
    finally:
        await stop()


def test_app_task_keywords_become_the_task_options() -> None:
    app = taskstream.App("memory://")
    plain = app.task(library.add)
    assert plain.name == "add" and plain.options == TaskOptions()
    tuned = app.task(name="adder", queue="sums", retries=2, retry_delay=1.5, timeout=9.0)(library.add)
    assert tuned.name == "adder"
    assert tuned.options == TaskOptions(queue="sums", retries=2, retry_delay=1.5, timeout=9.0)
    assert app.tasks.registry["adder"] is tuned


def test_app_task_names_an_unknown_keyword() -> None:
    app = taskstream.App("memory://")
    with pytest.raises(TypeError, match=r"queu\b.*it takes: cpu_bound, name, queue, retries"):
        app.task(queu="sums")  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="retries must be between 0 and 100, got -1"):
        app.task(retries=-1)


class _Recording:
    """A component that keeps what its ``start`` was given."""

    def __init__(self) -> None:
        self.given: list[object] = []

    async def start(self, context: AppContext) -> None:
        self.given.append(context)

    async def stop(self) -> None:
        pass


async def test_components_get_the_context_with_metrics_turned_on_late() -> None:
    app = taskstream.App("memory://", settings=quick_settings())
    recording = _Recording()
    app.add_component(recording)
    recorder = app.enable_metrics()
    async with app:
        (given,) = recording.given
        assert isinstance(given, AppContext) and given is app.context
        assert given.broker is app.broker and given.producer is app.producer and given.settings is app.settings
        assert given.metrics is recorder and app.tasks.context.metrics is recorder
        assert app.tasks.client.context is given


async def test_a_service_as_a_component_answers_on_the_apps_broker(tmp_path: Path) -> None:
    app = taskstream.App("memory://", settings=quick_settings())
    service = Service("ctx-echo", lambda body: {"echo": body}, lock_path=tmp_path / "echo.lock")
    app.add_component(service)
    async with app, ServiceClient(app.broker) as client:
        assert await client.call("ctx-echo", {"n": 1}, timeout=30) == {"echo": {"n": 1}}

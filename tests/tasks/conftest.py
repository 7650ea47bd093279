"""Fixtures of the task tests.

Backend-parametrized tests take the ``backend`` fixture and run once per backend in ``TASK_BACKENDS``, reusing
the broker contract suite's ``BackendSpec`` (how to reach the server, how to name queues). A backend joins
these tests by adding its contract-suite name to ``TASK_BACKENDS``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from taskstream.app import App
from taskstream.settings import Settings
from tests.brokers.contract.backends import BackendSpec, all_specs

TASK_BACKENDS = ("memory", "rabbitmq")
SPECS = [s for s in all_specs() if s.name in TASK_BACKENDS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [pytest.param(s, id=s.name, marks=getattr(pytest.mark, s.name)) for s in SPECS])


def quick_settings(**changes: Any) -> Settings:
    """Settings for tests: short shutdown grace, modest concurrency."""
    values: dict[str, Any] = {"shutdown_grace": 2.0, "concurrency": 8}
    values.update(changes)
    return Settings(**values)


class TaskEnv:
    """Per-test helper: Apps on one backend, unique queues, a shared result store, cleanup."""

    def __init__(self, spec: BackendSpec, tmp_path: Path) -> None:
        self.spec = spec
        self.tmp_path = tmp_path
        self.apps: list[App] = []
        self.queues: list[str] = []
        self.store_url = None if spec.name == "memory" else f"sqlite:///{tmp_path / 'results.sqlite3'}"

    @property
    def memory(self) -> bool:
        return self.spec.name == "memory"

    def queue(self, stem: str = "tq") -> str:
        name = self.spec.queue_name(f"{stem}-{uuid.uuid4().hex[:10]}")
        self.queues.append(name)
        return name

    def app(self, *, workers: bool = True, settings: Settings | None = None, **kwargs: Any) -> App:
        app = App(
            broker=self.spec.make(),
            settings=settings or quick_settings(),
            result_store=kwargs.pop("result_store", self.store_url),
            workers=workers,
            **kwargs,
        )
        self.apps.append(app)
        return app

    async def close(self) -> None:
        for app in reversed(self.apps):
            with contextlib.suppress(Exception):
                await app.stop()
        if self.spec.name != "memory" and self.queues:
            broker = self.spec.make()
            try:
                await broker.connect()
                for queue in self.queues:
                    for name in (queue, broker.dead_letter_name(queue)):
                        with contextlib.suppress(Exception):
                            await broker.delete_queue(name)
            finally:
                await broker.close()


@contextlib.asynccontextmanager
async def task_env(spec: BackendSpec, tmp_path: Path) -> AsyncIterator[TaskEnv]:
    """A :class:`TaskEnv` on ``spec``'s backend (its server checked first), closed after use."""
    if spec.setup is not None:
        await spec.setup()
    context = TaskEnv(spec, tmp_path)
    try:
        yield context
    finally:
        await context.close()


@pytest.fixture
async def env(backend: BackendSpec, tmp_path: Path) -> AsyncIterator[TaskEnv]:
    async with task_env(backend, tmp_path) as context:
        yield context

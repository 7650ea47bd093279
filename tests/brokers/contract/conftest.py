"""Fixtures of the broker contract suite: every test runs once per backend in ``backends/``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from taskstream.brokers.base import Broker, Delivery, Subscription
from taskstream.errors import QueueNotFound
from tests.brokers.contract.backends import BackendSpec, all_specs
from tests.support.names import unique
from tests.support.waiting import wait_for

SPECS = all_specs()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" in metafunc.fixturenames:
        metafunc.parametrize(
            "spec",
            [pytest.param(s, id=s.name, marks=getattr(pytest.mark, s.name)) for s in SPECS],
        )


class Ctx:
    """Per-test helper: makes connected brokers on one backend and unique queues, cleans up after."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.brokers: list[Broker] = []
        self.queues: list[str] = []

    async def broker(self, visibility_timeout: float | None = None) -> Broker:
        broker = self.spec.make(visibility_timeout=visibility_timeout)
        await broker.connect()
        self.brokers.append(broker)
        return broker

    async def queue(self, broker: Broker, *, fifo: bool = False, stem: str = "ct", topics: Sequence[str] = ()) -> str:
        """Declare a queue unique to this run (bound to ``topics``); :meth:`close` deletes it and its DLQ."""
        name = self.spec.queue_name(unique(stem))
        if fifo and not name.endswith(".fifo"):
            name = f"{name}.fifo"
        self.queues.append(name)  # before declaring: a half-done declare is cleaned up too
        await broker.declare(name, fifo=fifo, topics=topics)
        return name

    async def close(self) -> None:
        """Delete the queues the test declared (and their dead-letter queues), check they are gone, close."""
        try:
            if self.queues:
                await self._remove_queues()
        finally:
            for broker in self.brokers:
                with contextlib.suppress(Exception):
                    await broker.close()

    async def _remove_queues(self) -> None:
        # A broker of its own: the test may have closed or broken its brokers.
        cleaner = self.spec.make()
        self.brokers.append(cleaner)
        await cleaner.connect()
        names = [name for queue in self.queues for name in (queue, cleaner.dead_letter_name(queue))]
        for name in names:
            with contextlib.suppress(Exception):  # a dead-letter queue the test never used does not exist
                async with asyncio.timeout(10):
                    await cleaner.delete_queue(name)

        async def all_gone() -> bool:
            for name in names:
                try:
                    await cleaner.queue_stats(name)
                except QueueNotFound:
                    continue
                return False
            return True

        await wait_for(all_gone, what=f"the test's queues {names} to be deleted", timeout=30, interval=0.2)


@pytest.fixture
async def ctx(spec: BackendSpec) -> AsyncIterator[Ctx]:
    if spec.setup is not None:
        await spec.setup()
    context = Ctx(spec)
    try:
        yield context
    finally:
        await context.close()


async def receive(sub: Subscription, n: int, timeout: float = 30.0) -> list[Delivery]:
    """Receive exactly ``n`` deliveries or fail after ``timeout`` seconds saying how many came."""
    got: list[Delivery] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got) < n:
                got.append(await sub.__anext__())
    except TimeoutError:
        pytest.fail(f"expected {n} deliveries within {timeout} s, got {len(got)}")
    return got


async def receive_none(sub: Subscription, wait: float) -> None:
    """Fail if anything is delivered within ``wait`` seconds."""
    try:
        async with asyncio.timeout(wait):
            delivery = await sub.__anext__()
    except TimeoutError:
        return
    pytest.fail(f"expected no delivery, got {delivery!r}")

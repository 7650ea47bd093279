"""Fixtures of the observe tests: an App with a buggy consumer on each backend of the contract suite.

``orders`` runs an ``@app.consumer`` in this process on the backend's broker; its handler raises ``KeyError``
for orders 13 and 14 until ``fixed`` is set, so they are dead-lettered (after two attempts) by the real
consumer runtime. A second broker of the same backend (``inspect``) is what the observe functions use.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from taskstream import App
from taskstream.brokers.base import Broker
from taskstream.consumer import Message
from tests.brokers.contract.backends import BackendSpec, all_specs
from tests.support.waiting import wait_for

SPECS = all_specs()
BUGGY = (13, 14)


F = TypeVar("F", bound=Callable[..., Any])


def only_on(*names: str) -> Callable[[F], F]:
    """Run the decorated test only on these backends of the suite (by name)."""

    def mark(func: F) -> F:
        func.backends = names  # type: ignore[attr-defined]
        return func

    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "spec" in metafunc.fixturenames:
        only = getattr(metafunc.function, "backends", None)
        specs = [s for s in SPECS if only is None or s.name in only]
        metafunc.parametrize("spec", [pytest.param(s, id=s.name, marks=getattr(pytest.mark, s.name)) for s in specs])


@dataclass
class Orders:
    """The running app, its queue and what its handler saw."""

    app: App
    queue: str
    inspect: Broker
    handled: list[int] = field(default_factory=list)
    headers: dict[int, dict[str, Any]] = field(default_factory=dict)
    fixed: bool = False

    @property
    def dead_letter(self) -> str:
        return self.inspect.dead_letter_name(self.queue)

    async def dlq_depth(self) -> int:
        return await self.inspect.depth(self.dead_letter)

    async def wait_dlq_depth(self, n: int) -> None:
        async def check() -> bool:
            return await self.dlq_depth() == n

        await wait_for(check, what=f"{n} message(s) in {self.dead_letter}")

    async def wait_handled(self, *numbers: int) -> None:
        async def check() -> bool:
            return all(n in self.handled for n in numbers)

        await wait_for(check, what=f"orders {numbers} handled (handled so far: {self.handled})")


@pytest.fixture
async def orders(spec: BackendSpec) -> AsyncIterator[Orders]:
    if spec.setup is not None:
        await spec.setup()
    queue = spec.queue_name(f"obs-{uuid.uuid4().hex[:10]}")
    inspect = spec.make()
    await inspect.connect()
    app = App(broker=spec.make())
    state = Orders(app, queue, inspect)

    @app.consumer(queue, max_attempts=2)
    async def handle(order: dict[str, int], message: Message) -> None:
        number = order["n"]
        if number in BUGGY and not state.fixed:
            raise KeyError(f"no price for order {number}")
        state.handled.append(number)
        state.headers[number] = dict(message.delivery.headers)

    try:
        async with app:
            yield state
    finally:
        for name in (queue, inspect.dead_letter_name(queue)):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await inspect.delete_queue(name)
        await inspect.close()

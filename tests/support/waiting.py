"""Polling with a deadline, the suite's only way to wait: until something holds, or fail saying what did not happen."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest


async def wait_for(
    predicate: Callable[[], Any], *, what: str = "condition", timeout: float = 60.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return that value.

    Fails the test with ``what`` and the last value after ``timeout`` seconds.
    """
    value: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = predicate()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(interval)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what} (last value: {value!r})")


def wait_until(
    predicate: Callable[[], Any], *, what: str = "condition", timeout: float = 60.0, interval: float = 0.05
) -> Any:
    """The same as :func:`wait_for` for code without an event loop (a test driving processes)."""
    value: Any = None
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)

"""Module-level functions the task tests register (worker processes import them by name)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

MODEL: dict[str, Any] | None = None
LOADS = 0
GATE = threading.Event()


def add(a: int, b: int) -> int:
    return a + b


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def total(value: Any) -> float:
    """Sum every number inside nested lists and dict values."""
    if isinstance(value, dict):
        return sum(total(v) for v in value.values())
    if isinstance(value, list):
        return sum(total(v) for v in value)
    return float(value)


def fail(message: str) -> None:
    raise ValueError(message)


def fail_if_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x * 10


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def async_sleep_for(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


def wait_for_gate(timeout: float) -> str:
    """Block (on a worker thread) until the test opens ``GATE``."""
    if not GATE.wait(timeout):
        raise TimeoutError("the test never opened the gate")
    return "through"


def pid(*_: object) -> int:
    return os.getpid()


def pi(n: int) -> float:
    inside = 0
    rng = random.Random(n)
    for _ in range(n):
        x, y = rng.random(), rng.random()
        if x * x + y * y <= 1.0:
            inside += 1
    return 4.0 * inside / n


def crash() -> None:
    os._exit(3)


def load_model() -> None:
    global MODEL, LOADS
    LOADS += 1
    MODEL = {"pid": os.getpid(), "loads": LOADS}


def model_info(*_: object) -> dict[str, Any] | None:
    return MODEL


def broken_hook() -> None:
    raise RuntimeError("the model file is missing")


def flaky(path: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in a file, so any process can run it)."""
    counter = Path(path)
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(count))
    if count <= failures:
        raise ConnectionError(f"transient failure {count}")
    return count


def counted(path: str) -> int:
    """Append one line per run to ``path``; returns the number of runs so far."""
    with open(path, "a") as fh:
        fh.write("run\n")
    return len(Path(path).read_text().splitlines())


def unserializable() -> object:
    return object()

"""The "Task futures" section of ``taskstream demo``: a small pi bag of tasks, a dataflow edge, a remote failure."""

from __future__ import annotations

import os
import random
import time

from taskstream.app import App
from taskstream.errors import TaskError
from taskstream.tasks.errors import DependencyFailed
from taskstream.tasks.future import gather

__all__ = ["tasks_section"]


def estimate_pi(n: int, seed: int) -> float:
    """Pi from ``n`` random points (pure Python, CPU-bound: runs on worker processes)."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / n


def mean(values: list[float]) -> float:
    """The mean of the inputs (a dataflow edge: its argument is a list of futures)."""
    return sum(values) / len(values)


def calibrate(reading: float, factor: float) -> float:
    """Divides by ``factor``: fails remotely when it is zero."""
    return reading / factor


async def tasks_section(broker_url: str) -> None:
    """pi.map on worker processes (one block at a time vs all at once) -> mean (dataflow) -> a remote failure."""
    app = App(broker_url, workers=True)
    pi = app.task(queue="demo.tasks", cpu_bound=True)(estimate_pi)
    average = app.task(queue="demo.tasks")(mean)
    divide = app.task(queue="demo.tasks")(calibrate)
    calls, n = 8, 300_000
    async with app:
        await gather(pi.map([1000] * (os.cpu_count() or 1), range(os.cpu_count() or 1)))  # start worker processes
        started = time.perf_counter()
        for seed in range(calls):
            await pi.submit(n, seed)
        one_by_one = time.perf_counter() - started
        started = time.perf_counter()
        futures = pi.map([n] * calls, range(calls))
        total = average.submit(futures)  # runs only once all 8 estimates are in
        value = await total
        together = time.perf_counter() - started
        info = app.get_task(total.task_id)
        failing = divide.submit(21.5, 0)
        dependent = average.submit([failing, 3.0])
        try:
            await dependent
        except DependencyFailed as exc:
            chained = exc
        cause = chained.__cause__
    print(f"task futures: {calls} x pi({n}) on {os.cpu_count()} core(s) (cpu_bound: worker processes)")
    print(f"  one at a time: {one_by_one:.2f} s   all {calls} at once: {together:.2f} s")
    print(f"  mean of the estimates (a dataflow edge over {calls} futures): {value:.5f}")
    ran = 1000 * ((info.finished_at or 0.0) - (info.started_at or 0.0))
    print(f"  get_task({total.task_id[:12]}...) from the result store: {info.status}, ran {ran:.1f} ms")
    assert isinstance(cause, TaskError)
    print(f"  failed task, re-raised here: {str(cause).splitlines()[0]}")
    print("  remote traceback (last lines):")
    for line in cause.remote_traceback.strip().splitlines()[-3:]:
        print(f"    {line}")
    print(f"  its dependent: {type(chained).__name__}: {str(chained).splitlines()[0]}")

"""The worker-process pool: startup hooks once per process, autoscale up and down, kill on timeout, crashes."""

from __future__ import annotations

import asyncio
import os

import pytest

from taskstream.errors import TaskError
from taskstream.tasks import TaskRefused, TaskTimeout, WorkerLost
from taskstream.tasks.pool import ProcessPool
from tests.support.waiting import wait_for

LIB = "tests.tasks.library"


def ref(name: str) -> tuple[str, str, str]:
    return ("ref", LIB, name)


async def test_calls_run_in_other_processes_with_startup_hooks_once_each() -> None:
    pool = ProcessPool(min_size=2, max_size=2, hooks=[(LIB, "load_model")])
    await pool.start()
    try:
        await pool.wait_ready()
        infos = await asyncio.gather(*(pool.run(ref("model_info")) for _ in range(10)))
        pids = {info["pid"] for info in infos}
        assert os.getpid() not in pids and 1 <= len(pids) <= 2
        assert all(info["loads"] == 1 for info in infos)  # loaded once per process, not per call
        assert await pool.run(ref("add"), (2, 3)) == 5
        assert await pool.run(ref("async_add"), (2, 3)) == 5
        outcomes = await pool.run(ref("fail_if_negative"), items=[((1,), {}), ((-1,), {})])
        assert outcomes[0] == {"ok": 10} and outcomes[1]["error"]["type"] == "ValueError"
    finally:
        await pool.close()


async def test_errors_come_back_with_type_and_traceback() -> None:
    pool = ProcessPool(max_size=1)
    await pool.start()
    try:
        with pytest.raises(ValueError, match="boom") as caught:
            await pool.run(ref("fail"), ("boom",))
        assert isinstance(caught.value, TaskError) and "library.py" in caught.value.remote_traceback
        with pytest.raises(TaskRefused, match="cannot find"):
            await pool.run(("ref", LIB, "no_such_function"))
    finally:
        await pool.close()


async def test_autoscale_grows_under_load_and_shrinks_when_idle() -> None:
    pool = ProcessPool(min_size=0, max_size=2, idle_timeout=0.3)
    await pool.start()
    try:
        assert pool.size == 0
        await asyncio.gather(*(pool.run(ref("sleep_for"), (0.2,)) for _ in range(6)))
        assert pool.stats.peak == 2  # grew to the cap while calls waited, never beyond
        await wait_for(lambda: pool.size == 0, what="idle processes stopping")
        assert pool.stats.stopped_idle == 2
        pool.want(5)  # a deep broker queue asks for processes ahead of the calls
        assert pool.size == 2
    finally:
        await pool.close()


async def test_timeout_kills_the_process_and_a_new_one_takes_over() -> None:
    pool = ProcessPool(min_size=1, max_size=1)
    await pool.start()
    try:
        first = await pool.run(ref("pid"))
        with pytest.raises(TaskTimeout, match=f"pid {first}"):
            await pool.run(ref("sleep_for"), (60,), timeout=0.3)
        assert pool.stats.killed == 1
        second = await pool.run(ref("pid"))
        assert second != first
    finally:
        await pool.close()


async def test_a_dying_process_fails_its_call_only() -> None:
    pool = ProcessPool(max_size=2)
    await pool.start()
    try:
        crash = pool.run(ref("crash"))
        fine = pool.run(ref("add"), (1, 1))
        results = await asyncio.gather(crash, fine, return_exceptions=True)
        assert isinstance(results[0], WorkerLost) and results[1] == 2
        assert pool.stats.lost == 1
    finally:
        await pool.close()


async def test_cancelled_caller_frees_its_process() -> None:
    pool = ProcessPool(max_size=1)
    await pool.start()
    try:
        call = asyncio.ensure_future(pool.run(ref("sleep_for"), (60,)))
        await wait_for(lambda: pool.busy == 1, what="the call starting")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert pool.stats.killed == 1
        assert await pool.run(ref("add"), (1, 2)) == 3
    finally:
        await pool.close()


async def test_a_failing_startup_hook_stops_the_pool_with_its_error() -> None:
    pool = ProcessPool(max_size=1, hooks=[(LIB, "broken_hook")])
    await pool.start()
    try:
        with pytest.raises(TaskRefused, match="model file is missing"):
            await pool.run(ref("add"), (1, 1))
        with pytest.raises(TaskRefused):
            await pool.run(ref("add"), (1, 1))
    finally:
        await pool.close()


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="min_size"):
        ProcessPool(min_size=3, max_size=2)

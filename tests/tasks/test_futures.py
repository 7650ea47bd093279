"""Task futures on every backend: submit, await, errors, dataflow, map/gather/as_completed, status by id."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

import pytest

import taskstream
from taskstream.errors import TaskError
from taskstream.tasks import DependencyFailed, TaskFuture, TaskNotFound, as_completed, gather
from tests.support.waiting import wait_for
from tests.tasks import library
from tests.tasks.conftest import TaskEnv


async def test_submit_returns_at_once_then_result_arrives(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    add = app.task(queue=queue)(library.add)
    async_add = app.task(queue=queue)(library.async_add)
    async with app:
        fut = add.submit(2, 3)
        assert isinstance(fut, TaskFuture) and isinstance(fut, concurrent.futures.Future)
        assert not fut.done()  # nothing has even been published yet: submit returned at once
        seen: list[TaskFuture[int]] = []
        fut.add_done_callback(seen.append)
        assert await fut == 5
        assert fut.done() and fut.exception() is None and fut.result(0) == 5
        assert seen == [fut]
        assert fut.status == "success"
        assert await async_add.submit(40, 2) == 42


async def test_remote_error_has_type_message_and_traceback(env: TaskEnv) -> None:
    app = env.app()
    fail = app.task(queue=env.queue())(library.fail)
    async with app:
        fut = fail.submit("the flux capacitor is cold")
        with pytest.raises(ValueError, match="flux capacitor") as caught:
            await fut
    error = caught.value
    assert isinstance(error, TaskError)
    assert error.remote_type == "ValueError"
    assert "library.py" in error.remote_traceback and "in fail" in error.remote_traceback
    assert "raise ValueError(message)" in error.remote_traceback
    assert isinstance(fut.exception(), ValueError)
    info = app.get_task(fut.task_id)
    assert info.status == "failed" and info.error is not None and info.error["type"] == "ValueError"


async def test_dataflow_edges_through_nested_arguments(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    add = app.task(queue=queue)(library.add)
    total = app.task(queue=queue)(library.total)
    sleep_for = app.task(queue=queue)(library.sleep_for)
    async with app:
        slow = sleep_for.submit(0.3)
        a = add.submit(1, 2)
        b = add.submit(a, 4)  # a chain: b waits for a
        c = total.submit([a, {"x": b, "y": [slow, 10]}, 5])
        assert await c == 3 + 7 + 0.3 + 10 + 5
        # The dependent was dispatched only once its inputs were ready: it started after the slow input ended.
        slow_info = app.get_task(slow.task_id)
        c_info = app.get_task(c.task_id)
        assert slow_info.finished_at is not None and c_info.started_at is not None
        assert c_info.started_at >= slow_info.finished_at


async def test_failed_input_fails_dependents_with_a_chained_error(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    fail = app.task(queue=queue)(library.fail)
    add = app.task(queue=queue)(library.add)
    async with app:
        bad = fail.submit("sensor offline")
        middle = add.submit(bad, 1)
        last = add.submit(middle, 1)
        with pytest.raises(DependencyFailed) as caught:
            await last
        error = caught.value
        assert middle.task_id in str(error) and "sensor offline" in str(error)
        assert isinstance(error.__cause__, DependencyFailed)
        assert isinstance(error.__cause__.__cause__, ValueError)
        # Neither dependent ever ran.
        for fut in (middle, last):
            info = app.get_task(fut.task_id)
            assert info.status == "failed" and info.started_at is None


async def test_cancelled_input_fails_its_dependent(env: TaskEnv) -> None:
    client = env.app(workers=False)
    queue = env.queue()
    add = client.task(queue=queue)(library.add)
    async with client:
        waiting = add.submit(1, 1)  # nobody serves this queue yet
        dependent = add.submit(waiting, 1)
        assert waiting.cancel()
        with pytest.raises(DependencyFailed, match="cancelled"):
            await dependent


async def test_map_gather_and_as_completed(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    times_ten = app.task(queue=queue)(library.fail_if_negative)
    async with app:
        futures = times_ten.map(range(12))
        assert await gather(futures) == [x * 10 for x in range(12)]
        chunked = times_ten.map([1, 2, -3, 4, 5], chunksize=2)
        assert len({f.task_id for f in chunked}) == 3 and [f.index for f in chunked] == [0, 1, 0, 1, 0]
        outcomes = await gather(chunked, return_exceptions=True)
        assert outcomes[:2] == [10, 20] and outcomes[3:] == [40, 50]
        assert isinstance(outcomes[2], ValueError) and "negative: -3" in str(outcomes[2])
        with pytest.raises(ValueError):
            await gather(*chunked)
        seen = [f async for f in as_completed(times_ten.map(range(5)), timeout=30)]
        assert sorted(f.result(0) for f in seen) == [0, 10, 20, 30, 40]


async def test_get_task_reports_pending_running_success_with_timestamps(env: TaskEnv) -> None:
    library.GATE.clear()
    queue = env.queue()
    client = env.app(workers=False)
    gate = client.task(queue=queue)(library.wait_for_gate)
    async with client:
        fut = gate.submit(60)
        assert client.get_task(fut.task_id).status == "pending"
        await wait_for(lambda: client.tasks.store.get(fut.task_id), what="the pending record")
        worker = env.app()
        worker.task(queue=queue)(library.wait_for_gate)
        async with worker:
            running = await wait_for(
                lambda: (i := client.get_task(fut.task_id)).status == "running" and i, what="running"
            )
            assert running.started_at is not None and running.finished_at is None
            library.GATE.set()
            assert await fut == "through"
        done = client.get_task(fut.task_id)
    assert done.status == "success" and done.result == "through" and done.attempts == 1
    assert done.submitted_at is not None and done.started_at is not None and done.finished_at is not None
    assert done.submitted_at <= done.started_at <= done.finished_at
    assert done.worker.endswith(f":{os.getpid()}")
    with pytest.raises(TaskNotFound):
        client.get_task("no-such-task")


async def test_status_and_result_by_id_from_another_client(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app()
    worker.task(queue=queue)(library.add)
    client = env.app(workers=False)
    add = client.remote("add", queue=queue)
    async with worker, client:
        fut = add.submit(20, 22)
        assert await fut == 42
    other = env.app(workers=False)  # a different client, never started
    info = other.get_task(fut.task_id)
    assert info.status == "success" and info.outcome() == 42 and info.name == "add"


async def test_retries_then_success_or_final_failure(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    retried = app.task(queue=queue, retries=2, retry_delay=0.01, name="retried")(library.flaky)
    gives_up = app.task(queue=queue, retries=1, retry_delay=0.01, name="gives_up")(library.flaky)
    async with app:
        ok = retried.submit(str(env.tmp_path / "a"), 2)
        assert await ok == 3
        bad = gives_up.submit(str(env.tmp_path / "b"), 5)
        with pytest.raises(ConnectionError, match="transient failure 2"):
            await bad
    assert app.get_task(ok.task_id).attempts == 3
    assert app.get_task(bad.task_id).attempts == 2


async def test_timeouts_cancel_async_and_abandon_threads(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    async_slow = app.task(queue=queue, timeout=0.2)(library.async_sleep_for)
    sync_slow = app.task(queue=queue, timeout=0.2)(library.sleep_for)
    async with app:
        with pytest.raises(taskstream.tasks.TaskTimeout, match="cancelled"):
            await async_slow.submit(30)
        with pytest.raises(taskstream.tasks.TaskTimeout, match="abandoned"):
            await sync_slow.submit(1.0)


async def test_cancel_a_queued_task(env: TaskEnv) -> None:
    queue = env.queue()
    marker = env.tmp_path / "runs.txt"
    client = env.app(workers=False)
    counted = client.task(queue=queue)(library.counted)
    async with client:
        fut = counted.submit(str(marker))
        await wait_for(lambda: client.tasks.store.get(fut.task_id), what="the pending record")
        assert fut.cancel() and fut.cancelled() and fut.status == "cancelled"
        with pytest.raises(concurrent.futures.CancelledError):
            await fut
        assert client.get_task(fut.task_id).status == "cancelled"
        worker = env.app()
        worker.task(queue=queue)(library.counted)
        done_after = worker.task(queue=queue, name="after")(library.add)
        async with worker:
            # The worker takes the cancelled message off the queue without running it.
            assert await client.remote("after", queue=queue).submit(1, 1) == 2
            await wait_for(lambda: _acked(worker) >= 2, what="both messages taken off the queue")
        assert done_after.name == "after"
    assert not marker.exists()  # the cancelled call never ran
    assert fut.cancel()  # cancelling again reports that it is cancelled


async def test_running_or_finished_task_cannot_be_cancelled(env: TaskEnv) -> None:
    app = env.app()
    add = app.task(queue=env.queue())(library.add)
    async with app:
        fut = add.submit(1, 2)
        await fut
        assert not fut.cancel()
        assert not app.cancel_task(fut.task_id)


async def test_unknown_task_is_refused_and_dead_lettered(env: TaskEnv) -> None:
    queue = env.queue()
    worker = env.app()
    worker.task(queue=queue)(library.add)
    client = env.app(workers=False)
    async with worker, client:
        with pytest.raises(taskstream.tasks.TaskRefused, match=r"no task named 'nope'.*knows: add"):
            await client.remote("nope", queue=queue).submit()
        broker = client.broker
        dlq = broker.dead_letter_name(queue)
        sub = broker.consume(dlq, prefetch=10)
        try:
            async with asyncio.timeout(20):
                delivery = await sub.__anext__()
            assert "no task named 'nope'" in str(delivery.headers.get("x-death-reason"))
            await delivery.ack()
        finally:
            await sub.close()


async def test_a_result_that_cannot_travel_fails_clearly(env: TaskEnv) -> None:
    app = env.app()
    bad = app.task(queue=env.queue())(library.unserializable)
    async with app:
        with pytest.raises(TypeError, match="cannot travel"):
            await bad.submit()


async def test_cpu_bound_tasks_run_in_worker_processes_with_startup_hooks(env: TaskEnv) -> None:
    app = env.app()
    app.on_startup(scope="processes")(library.load_model)
    queue = env.queue()
    pid = app.task(queue=queue, cpu_bound=True)(library.pid)
    model_info = app.task(queue=queue, cpu_bound=True)(library.model_info)
    pi = app.task(queue=queue, cpu_bound=True)(library.pi)
    async with app:
        pids = await gather(pid.map(range(4)))
        assert os.getpid() not in pids
        infos = await gather(model_info.map(range(6)))
        for info in infos:
            assert info is not None and info["loads"] == 1 and info["pid"] != os.getpid()
        estimate = await pi.submit(20_000)
        assert 3.0 < estimate < 3.3
    assert library.MODEL is None  # scope="processes": never loaded in this process


async def test_cpu_bound_timeout_kills_the_process(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    slow = app.task(queue=queue, cpu_bound=True, timeout=0.5)(library.sleep_for)
    pid = app.task(queue=queue, cpu_bound=True)(library.pid)
    async with app:
        first = await pid.submit()
        with pytest.raises(taskstream.tasks.TaskTimeout, match="killed"):
            await slow.submit(60)
        assert app.tasks.worker is not None and app.tasks.worker.pool is not None
        assert app.tasks.worker.pool.stats.killed >= 1
        assert isinstance(await pid.submit(), int) and first > 0


async def test_a_crashing_worker_process_is_reported_and_replaced(env: TaskEnv) -> None:
    app = env.app()
    queue = env.queue()
    crash = app.task(queue=queue, cpu_bound=True)(library.crash)
    add = app.task(queue=queue, cpu_bound=True)(library.add)
    async with app:
        with pytest.raises(taskstream.tasks.WorkerLost, match="exit code 3"):
            await crash.submit()
        assert await add.submit(1, 2) == 3


def test_sync_callers_use_a_background_loop(env: TaskEnv) -> None:
    """A plain script: no event loop, no 'async with'; submit, result(timeout), close."""
    app = env.app()
    queue = env.queue()
    add = app.task(queue=queue)(library.add)
    fail = app.task(queue=queue)(library.fail)
    with app:
        fut = add.submit(add.submit(1, 2), 3)
        assert fut.result(timeout=30) == 6
        assert isinstance(fail.submit("x").exception(timeout=30), ValueError)
        results = gather(add.map(range(30), range(30)), progress=True).result(timeout=60)
        assert results == [2 * i for i in range(30)]
        assert [f.result(0) for f in as_completed([fut], timeout=5)] == [6]
    # After close the record is still there on every backend (a memory store keeps its records).
    info = app.get_task(fut.task_id)
    assert info.status == "success" and info.result == 6 and info.finished_at is not None


async def test_sync_result_inside_a_running_loop_like_jupyter(env: TaskEnv) -> None:
    """A notebook cell has a running loop; the sync API still works (the App runs on its own thread)."""
    app = env.app()
    add = app.task(queue=env.queue())(library.add)
    try:
        fut = add.submit(5, 6)
        assert fut.result(timeout=30) == 11  # blocking call inside a running loop
        assert await add.submit(1, 1) == 2  # and awaiting works too
    finally:
        await asyncio.to_thread(app.close)


async def test_blocking_on_the_apps_own_loop_raises_instead_of_deadlocking(env: TaskEnv) -> None:
    app = env.app()
    slow = app.task(queue=env.queue())(library.async_sleep_for)
    async with app:
        fut = slow.submit(0.2)
        with pytest.raises(RuntimeError, match="use 'await future'"):
            fut.result()
        assert await fut == 0.2


async def test_awaiting_with_a_timeout_does_not_cancel_the_task(env: TaskEnv) -> None:
    app = env.app()
    slow = app.task(queue=env.queue())(library.async_sleep_for)
    async with app:
        fut = slow.submit(0.5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.ensure_future(_wait(fut)), 0.05)
        assert not fut.cancelled()
        assert await fut == 0.5


def _acked(app: taskstream.App) -> int:
    worker = app.tasks.worker
    return sum(c.stats.acked for c in worker.consumers.values()) if worker is not None else 0


async def _wait(fut: TaskFuture[float]) -> float:
    return await fut

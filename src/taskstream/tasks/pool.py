"""Worker processes for ``cpu_bound`` tasks: a process pool with per-process startup, kill-on-timeout and autoscale.

Each worker process runs one call at a time, so a pool of N processes keeps N cores busy. The parent talks to
each process over its own pipe, watched by the event loop (``add_reader``), so no thread waits on results.

* Startup: every process takes the parent's environment as it is when the process starts, imports the
  ``@app.on_startup`` hooks by name and runs them once before it takes work (load a model once per
  process, not per call). A hook that fails stops the pool with that error.
* Functions travel by reference (``module`` + ``qualname``; a task object at that name is unwrapped), or
  as verified shipped source. Arguments and results cross the pipe pickled: both ends are this program.
* Timeout: the call's process is killed and replaced; the caller gets :class:`TaskTimeout`. A caller that
  is cancelled (worker shutdown) kills its process the same way, so no orphaned work keeps a core busy.
* A process that dies (crash, OOM kill) fails its call with :class:`WorkerLost` and is replaced.
* Autoscale between ``min_size`` and ``max_size``: a call that finds no idle process starts one at once
  (up to ``max_size``); :meth:`want` lets the worker ask for more while its broker queue is deep; a process
  idle for ``idle_timeout`` seconds is stopped while the pool is above ``min_size``.

Start method: ``forkserver`` on POSIX (the parent has threads, so plain fork is unsafe), ``spawn`` where
that is all there is, and ``fork`` when ``__main__`` is interactive (a notebook), the only way a function
typed into a notebook reaches another process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import inspect
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from taskstream.errors import TaskError
from taskstream.tasks.errors import TaskRefused, TaskTimeout, WorkerLost, error_from_data, error_to_data

__all__ = ["DEFAULT_IDLE_TIMEOUT", "PoolStats", "ProcessPool", "Target", "resolve_function"]

log = logging.getLogger("taskstream.tasks.pool")

DEFAULT_IDLE_TIMEOUT = 30.0
SCALE_INTERVAL = 0.25

# ("ref", module, qualname) or ("code", name, source, sig)
Target = tuple[str, ...]


async def _join(process: multiprocessing.process.BaseProcess, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``process`` to end, and reap it, without a thread.

    Polling on the loop instead of ``asyncio.to_thread(process.join)``: at interpreter exit (an App stopped by
    its ``atexit`` hook) the loop's default executor no longer takes work.
    """
    if process.pid is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    while process.is_alive() and loop.time() < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    if not process.is_alive():
        process.join(0)


def resolve_function(module: str, qualname: str) -> Callable[..., Any]:
    """Import ``module`` and walk ``qualname``; a task object found there gives its plain function.

    Raises:
        TaskRefused: the module or name does not exist in this process.
    """
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise TaskRefused(f"cannot find {module}:{qualname} in the worker process: {exc}") from exc
    inner = getattr(obj, "__taskstream_func__", None)
    func = inner if inner is not None else obj
    if not callable(func):
        raise TaskRefused(f"{module}:{qualname} is not callable")
    return func  # type: ignore[no-any-return]


def _load_target(target: Target) -> Callable[..., Any]:
    if target[0] == "ref":
        return resolve_function(target[1], target[2])
    from taskstream.tasks.protocol import ShippedCode, load_shipped

    return load_shipped(ShippedCode(name=target[1], source=target[2], sig=target[3]))


def _invoke(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    result = func(*args, **kwargs)
    if inspect.isawaitable(result):

        async def wait() -> Any:
            return await result

        return asyncio.run(wait())
    return result


def run_items(
    func: Callable[..., Any], items: Sequence[tuple[Sequence[Any], dict[str, Any]]], retries: int
) -> list[dict[str, Any]]:
    """Call ``func`` once per item (retrying each failure in place up to ``retries`` times).

    Returns one ``{"ok": value}`` or ``{"error": {...}}`` per item.
    """
    outcomes: list[dict[str, Any]] = []
    for args, kwargs in items:
        for attempt in itertools.count(1):
            try:
                outcomes.append({"ok": _invoke(func, args, kwargs)})
                break
            except Exception as exc:
                if attempt > retries:
                    outcomes.append({"error": error_to_data(exc)})
                    break
    return outcomes


def _child_main(
    conn: multiprocessing.connection.Connection, hooks: list[tuple[str, str]], environ: dict[str, str]
) -> None:
    """The loop of one worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    os.environ.update(environ)  # the parent's environment now, not the fork server's from when it started
    os.environ["TASKSTREAM_WORKER_PROCESS"] = "1"
    try:
        for module, qualname in hooks:
            _invoke(resolve_function(module, qualname), (), {})
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("fatal", error_to_data(exc)))
        return
    try:
        conn.send(("ready", os.getpid()))
    except OSError:  # the pool closed while this process was starting
        return
    cache: dict[Target, Callable[..., Any]] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, call_id, target, args, kwargs, items, retries = message
        try:
            func = cache.get(target)
            if func is None:
                func = cache[target] = _load_target(target)
            value = _invoke(func, args, kwargs) if items is None else run_items(func, items, retries)
            reply: tuple[Any, ...] = ("ok", call_id, value)
        except BaseException as exc:
            reply = ("err", call_id, error_to_data(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # the result does not pickle
            conn.send(("err", call_id, error_to_data(TypeError(f"the result cannot leave the worker process: {exc}"))))


def choose_start_method() -> str:
    """``fork`` for an interactive ``__main__`` (notebook), else ``forkserver``, else ``spawn``."""
    methods = multiprocessing.get_all_start_methods()
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__file__") and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


@dataclass(eq=False)
class _Call:
    call_id: int
    payload: tuple[Any, ...]
    started: asyncio.Future[_Proc]
    done: asyncio.Future[Any]


@dataclass(eq=False)
class _Proc:
    process: Any  # multiprocessing.Process of the chosen context
    conn: multiprocessing.connection.Connection
    state: Literal["starting", "idle", "busy", "gone"] = "starting"
    call: _Call | None = None
    idle_since: float = field(default_factory=time.monotonic)
    pid: int | None = None


@dataclass(slots=True)
class PoolStats:
    """Counters of a pool (for logs, tests and the autoscale example)."""

    started: int = 0
    stopped_idle: int = 0
    killed: int = 0
    lost: int = 0
    calls: int = 0
    peak: int = 0


class ProcessPool:
    """A pool of worker processes for CPU-bound calls. Create, ``await start()``, ``await run(...)``, ``await close()``.

    Args:
        min_size: processes kept running (started by :meth:`start`).
        max_size: most processes at once.
        idle_timeout: seconds a process may sit idle before it is stopped (while above ``min_size``).
        hooks: ``(module, qualname)`` of functions every process runs once at startup.
        start_method: multiprocessing start method; chosen by :func:`choose_start_method` when ``None``.
    """

    def __init__(
        self,
        *,
        min_size: int = 0,
        max_size: int | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        hooks: Sequence[tuple[str, str]] = (),
        start_method: str | None = None,
    ) -> None:
        max_size = max_size or os.cpu_count() or 1
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ValueError(f"need 0 <= min_size <= max_size and max_size >= 1, got {min_size}:{max_size}")
        self.min_size = min_size
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.hooks = list(hooks)
        self.start_method = start_method or choose_start_method()
        self.stats = PoolStats()
        self._ctx: Any = multiprocessing.get_context(self.start_method)
        self._procs: list[_Proc] = []
        self._waiting: collections.deque[_Call] = collections.deque()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scaler: asyncio.Task[None] | None = None
        self._broken: TaskError | None = None
        self._closed = False
        self._reaping: set[asyncio.Task[None]] = set()

    # -- figures -------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Live processes (starting, idle or busy)."""
        return sum(1 for p in self._procs if p.state != "gone")

    @property
    def busy(self) -> int:
        """Processes running a call."""
        return sum(1 for p in self._procs if p.state == "busy")

    @property
    def waiting(self) -> int:
        """Calls waiting for a process."""
        return len(self._waiting)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start ``min_size`` processes and the autoscaler."""
        self._loop = asyncio.get_running_loop()
        for _ in range(self.min_size):
            self._spawn()
        self._scaler = asyncio.create_task(self._scale_loop(), name="taskstream-pool-autoscale")

    async def wait_ready(self, count: int | None = None, timeout: float = 60.0) -> None:
        """Wait until ``count`` processes (default ``min_size``) finished their startup hooks."""
        count = self.min_size if count is None else count
        async with asyncio.timeout(timeout):
            while sum(1 for p in self._procs if p.state in ("idle", "busy")) < count:
                if self._broken is not None:
                    raise self._broken
                await asyncio.sleep(0.02)

    async def close(self, grace: float = 5.0) -> None:
        """Stop every process: idle ones at once, busy ones after ``grace`` seconds (then killed)."""
        if self._closed:
            return
        self._closed = True
        if self._scaler is not None:
            self._scaler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scaler
        while self._waiting:
            call = self._waiting.popleft()
            if not call.started.done():
                call.started.set_exception(WorkerLost("the process pool was closed before the call started"))
        if self._reaping:  # let processes that are being started finish starting
            await asyncio.gather(*list(self._reaping), return_exceptions=True)
        procs = [p for p in self._procs if p.state != "gone"]
        for p in procs:
            if p.state != "busy":
                with contextlib.suppress(OSError, ValueError):
                    p.conn.send(("stop",))
        deadline = time.monotonic() + grace
        while any(p.state == "busy" for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.state == "busy":
                self._kill(p, WorkerLost("the worker process was stopped with the pool"))
            else:
                self._detach(p)
        procs = [p for p in procs if p.pid is not None]
        await asyncio.gather(*(_join(p.process, grace) for p in procs))
        for p in procs:
            if p.process.is_alive():
                p.process.kill()
                await _join(p.process, 5.0)
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)

    # -- calls ---------------------------------------------------------------------------------------

    async def run(
        self,
        target: Target,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        items: Sequence[tuple[Sequence[Any], dict[str, Any]]] | None = None,
        retries: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """Run ``target(*args, **kwargs)`` (or once per item) in a worker process and return its result.

        ``timeout`` counts from the moment a process takes the call, not while it waits for one.

        Raises:
            TaskError: the function raised (rebuilt with the remote type, message and traceback).
            TaskTimeout: it ran longer than ``timeout``; its process was killed and replaced.
            WorkerLost: its process died.
        """
        if self._closed:
            raise WorkerLost("the process pool is closed")
        if self._broken is not None:
            raise self._broken
        loop = asyncio.get_running_loop()
        call_id = next(self._ids)
        payload = ("call", call_id, target, list(args), kwargs or {}, items, retries)
        call = _Call(call_id, payload, loop.create_future(), loop.create_future())
        self._waiting.append(call)
        self.stats.calls += 1
        self._dispatch()
        try:
            proc = await call.started
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._waiting.remove(call)
            if call.started.done() and not call.started.cancelled() and call.started.exception() is None:
                self._kill(call.started.result(), None)  # it had just been handed to a process
            raise
        try:
            if timeout is None:
                return await call.done
            return await asyncio.wait_for(asyncio.shield(call.done), timeout)
        except TimeoutError:
            if call.done.done():  # answered in the same instant
                return call.done.result()
            self._kill(proc, None)
            raise TaskTimeout(
                f"ran longer than its timeout of {timeout} s; its worker process (pid {proc.pid}) was killed"
            ) from None
        except asyncio.CancelledError:
            # (cancelling the caller cancels the future it awaited: call.done is cancelled, not answered)
            if call.done.cancelled() or not call.done.done():
                self._kill(proc, None)  # nobody wants the answer: free the core
            raise

    def want(self, backlog: int) -> None:
        """Grow toward ``busy + backlog`` processes (capped at ``max_size``); used with a queue's depth."""
        if self._closed or self._broken is not None:
            return
        target = min(self.max_size, self.busy + self.waiting + max(0, backlog))
        for _ in range(target - self.size):
            self._spawn()

    # -- internals -----------------------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._loop is not None, "ProcessPool.start() was not awaited"
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_child_main,
            args=(child, self.hooks, dict(os.environ)),
            daemon=True,
            name="taskstream-worker-process",
        )
        proc = _Proc(process, parent)
        self._procs.append(proc)
        self.stats.started += 1
        self.stats.peak = max(self.stats.peak, self.size)
        task = self._loop.create_task(self._start_process(proc, child))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _start_process(self, proc: _Proc, child: multiprocessing.connection.Connection) -> None:
        try:
            await asyncio.to_thread(proc.process.start)
        except Exception as exc:
            log.error("cannot start a worker process: %s", exc)
            proc.state = "gone"
            self._procs.remove(proc)
            self._broken = WorkerLost(f"cannot start a worker process: {exc}")
            self._fail_waiting(self._broken)
            return
        finally:
            child.close()
        proc.pid = proc.process.pid
        if proc.state == "gone" or self._loop is None:
            return
        self._loop.add_reader(proc.conn.fileno(), self._readable, proc)

    def _readable(self, proc: _Proc) -> None:
        try:
            while proc.state != "gone" and proc.conn.poll():
                self._on_message(proc, proc.conn.recv())
        except (EOFError, OSError):
            self._lost(proc)
        self._dispatch()

    def _on_message(self, proc: _Proc, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            proc.state = "idle"
            proc.idle_since = time.monotonic()
            log.info("worker process %s ready (%d running, %d..%d)", proc.pid, self.size, self.min_size, self.max_size)
        elif kind == "fatal":
            error = error_from_data(message[1])
            self._broken = TaskRefused(f"a worker process failed in its startup hooks: {error}")
            log.error("%s", self._broken)
            self._detach(proc)
            self._fail_waiting(self._broken)
        elif kind in ("ok", "err"):
            call, proc.call = proc.call, None
            proc.state = "idle"
            proc.idle_since = time.monotonic()
            if call is None or call.done.done():
                return
            if kind == "ok":
                call.done.set_result(message[2])
            else:
                call.done.set_exception(error_from_data(message[2]))

    def _fail_waiting(self, error: BaseException) -> None:
        while self._waiting:
            call = self._waiting.popleft()
            if not call.started.done():
                call.started.set_exception(error)

    def _dispatch(self) -> None:
        if self._closed:
            return
        for proc in self._procs:
            if not self._waiting:
                break
            if proc.state != "idle":
                continue
            call = self._waiting.popleft()
            if call.started.done():  # its caller went away
                continue
            try:
                proc.conn.send(call.payload)
            except Exception as exc:  # unpicklable arguments, or the pipe broke
                if isinstance(exc, OSError | EOFError):
                    self._lost(proc)
                    self._waiting.appendleft(call)
                    continue
                call.started.set_exception(TypeError(f"the arguments cannot reach the worker process: {exc}"))
                continue
            proc.state = "busy"
            proc.call = call
            call.started.set_result(proc)
        if self._waiting and self._broken is None:
            starting = sum(1 for p in self._procs if p.state == "starting")
            for _ in range(min(self.max_size - self.size, len(self._waiting) - starting)):
                self._spawn()

    def _detach(self, proc: _Proc) -> None:
        if proc.state == "gone":
            return
        proc.state = "gone"
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(proc.conn.fileno())
        with contextlib.suppress(OSError):
            proc.conn.close()
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def _lost(self, proc: _Proc) -> None:
        call = proc.call
        self._detach(proc)
        proc.process.join(0.5)
        self.stats.lost += 1
        log.warning("worker process %s died (exit code %s)", proc.pid, proc.process.exitcode)
        if call is not None and not call.done.done():
            code = proc.process.exitcode
            call.done.set_exception(
                WorkerLost(f"the worker process (pid {proc.pid}) died while running the task (exit code {code})")
            )
        self._keep_minimum()

    def _kill(self, proc: _Proc, error: BaseException | None) -> None:
        log.info("killing worker process %s", proc.pid)
        call = proc.call
        self._detach(proc)
        with contextlib.suppress(Exception):
            proc.process.kill()
        self.stats.killed += 1
        if call is not None and error is not None and not call.done.done():
            call.done.set_exception(error)
        if self._loop is not None:
            task = self._loop.create_task(_join(proc.process, 5.0))
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)
        self._keep_minimum()

    def _keep_minimum(self) -> None:
        if self._closed or self._broken is not None:
            return
        for _ in range(self.min_size - self.size):
            self._spawn()
        self._dispatch()

    async def _scale_loop(self) -> None:
        while True:
            await asyncio.sleep(SCALE_INTERVAL)
            now = time.monotonic()
            for proc in list(self._procs):
                if self.size <= self.min_size:
                    break
                if proc.state == "idle" and now - proc.idle_since >= self.idle_timeout:
                    log.info("stopping worker process %s: idle for %.1f s", proc.pid, now - proc.idle_since)
                    with contextlib.suppress(OSError, ValueError):
                        proc.conn.send(("stop",))
                    self._detach(proc)
                    self.stats.stopped_idle += 1
                    task = asyncio.create_task(_join(proc.process, 5.0))
                    self._reaping.add(task)
                    task.add_done_callback(self._reaping.discard)
            self._keep_minimum()

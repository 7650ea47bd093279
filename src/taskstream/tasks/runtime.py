"""``TaskRuntime``: everything task-related that hangs off one App.

It owns the registry, the result store, the submitting client and (when this process runs tasks) the
worker, and it decides which event loop all of that lives on:

* ``async with app:`` (or ``app.serve()``): the caller's loop. ``submit`` from other threads is handed over
  with ``call_soon_threadsafe``.
* Sync code (a script, a notebook cell) that submits to an App nobody started: the App starts itself on the
  process's background :class:`~taskstream.tasks.loop.LoopThread` and stops at interpreter exit (or
  ``app.close()``, or leaving ``with app:``). All such Apps share that one loop, so several Apps on one
  memory hub (whose state belongs to one loop) work together from sync code.

Who runs tasks: on the memory broker the App itself (in-process workers: async on the loop, sync on
threads, ``cpu_bound`` on a process pool sized to the cores); on a real broker only ``taskstream worker``
(or ``App(workers=True)``) does, and a plain App only submits.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from taskstream.config_check import setting
from taskstream.errors import ConfigurationError
from taskstream.producer import Producer
from taskstream.settings import env_name
from taskstream.tasks.client import TaskClient
from taskstream.tasks.errors import TaskNotFound
from taskstream.tasks.future import TaskFuture
from taskstream.tasks.loop import LoopThread
from taskstream.tasks.registry import DEFAULT_TASK_QUEUE, Task, TaskOptions, function_ref
from taskstream.tasks.stores.base import ResultStore, TaskInfo, default_sqlite_path, result_store_from_url
from taskstream.tasks.stores.memory import MemoryResultStore
from taskstream.tasks.worker import TaskWorker, WorkerConfig

if TYPE_CHECKING:
    from taskstream.context import AppContext

__all__ = ["TaskRuntime"]

log = logging.getLogger("taskstream.tasks")

EXIT_GRACE = 2.0

_OWNED: weakref.WeakSet[TaskRuntime] = weakref.WeakSet()
_SHARED: LoopThread | None = None
_SHARED_LOCK = threading.Lock()


def background_loop() -> LoopThread:
    """The process's loop thread for Apps used from sync code (started on first use)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or not _SHARED.thread.is_alive():
            _SHARED = LoopThread(name="taskstream-background")
        return _SHARED


@atexit.register
def _close_background_apps() -> None:
    for runtime in list(_OWNED):
        runtime.close(grace=EXIT_GRACE)
    if _SHARED is not None:
        _SHARED.stop()


class TaskRuntime:
    """Task futures for one App (``app.tasks``). The App's ``task``/``get_task``/... delegate here.

    Args:
        context: what it uses of the App (broker, producer, settings, metrics, result store, start/stop); the
            App passes its context again to :meth:`start` (it changes when metrics are turned on late).
        workers: run task workers in this process; ``None``: when the broker runs in this process.
    """

    def __init__(self, context: AppContext, *, workers: bool | None) -> None:
        self.context = context
        self.registry: dict[str, Task[Any, Any]] = {}
        self.client = TaskClient(self, context)
        self.worker: TaskWorker | None = None
        self.worker_config: WorkerConfig | None = None
        self._workers = workers
        self._store: ResultStore | None = None
        self._store_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._owned: LoopThread | None = None
        self._start_lock = threading.Lock()
        self._process_hooks: list[Callable[[], Any]] = []
        self._stop_grace: float | None = None

    # -- configuration -------------------------------------------------------------------------------

    @property
    def producer(self) -> Producer:
        """The App's producer (encoding and size checks)."""
        return self.context.producer

    @property
    def store(self) -> ResultStore:
        """The result store, built on first use (see :func:`result_store_from_url`)."""
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = self._make_store()
        return self._store

    def _store_source(self) -> tuple[str | None, str]:
        """The configured result store URL (``None``: the default) and what error messages call it."""
        configured = self.context.result_store
        if isinstance(configured, str):
            return configured, "App(result_store=...)"
        if self.context.settings.result_store_url is not None:
            return self.context.settings.result_store_url.get_secret_value(), env_name("result_store_url")
        return None, "the default result store"

    def _make_store(self) -> ResultStore:
        arg = self.context.result_store
        ttl = self.context.settings.result_ttl
        if isinstance(arg, ResultStore):
            return arg
        url, name = self._store_source()
        if url is None:
            broker = self.context.broker
            if broker.capabilities.in_process:
                hub = getattr(broker, "hub_name", None) or ""
                url = f"memory://{hub}"
            else:
                url = f"sqlite:///{default_sqlite_path()}"
        with setting(name):
            return result_store_from_url(url, ttl=ttl)

    def open_store(self) -> None:
        """Open the result store now if it was configured or this App runs tasks, so a bad URL fails the start.

        A client that only consumes and never configured a store does not create the default SQLite file.

        Raises:
            ConfigurationError: led by the setting's name, e.g. ``TASKSTREAM_RESULT_STORE_URL: unknown result
                store URL scheme 'foo' ...`` or ``...: cannot open the SQLite result store ...``.
        """
        configured = self.context.result_store is not None or self.context.settings.result_store_url is not None
        if configured or self.runs_workers():
            _ = self.store

    def signing_key(self) -> bytes | None:
        """``settings.signing_key`` as bytes, or ``None``."""
        key = self.context.settings.signing_key
        return key.get_secret_value().encode() if key is not None else None

    def runs_workers(self) -> bool:
        """True when this App executes tasks itself (memory broker by default, or ``workers=True``)."""
        if self.worker_config is not None:
            return True
        if self._workers is not None:
            return self._workers
        return self.context.broker.capabilities.in_process

    def enable_worker(self, config: WorkerConfig) -> None:
        """Make this App a task worker with ``config`` when it starts (what ``taskstream worker`` does)."""
        self.worker_config = config

    def add_process_hook(self, hook: Callable[[], Any], *, required: bool) -> None:
        """Run ``hook`` once in every worker process before it takes work (``@app.on_startup``)."""
        if function_ref(hook) is None:
            if required:
                raise ConfigurationError(
                    f"startup hook {hook.__qualname__} must run in worker processes, which import it by name: "
                    "define it at module level"
                )
            return
        self._process_hooks.append(hook)

    def process_hooks(self) -> list[tuple[str, str]]:
        """``(module, qualname)`` of the hooks worker processes run."""
        refs = [function_ref(h) for h in self._process_hooks]
        return [r for r in refs if r is not None]

    def task_queues(self) -> list[str]:
        """The queues of every registered task (each served by in-process workers)."""
        return sorted({t.options.queue for t in self.registry.values() if t.func is not None})

    # -- registration --------------------------------------------------------------------------------

    def register(self, func: Callable[..., Any], name: str | None, options: TaskOptions) -> Task[Any, Any]:
        """Register ``func`` as a task under ``name`` (default: its ``__name__``); ``@app.task`` comes here.

        Raises:
            ConfigurationError: ``func`` is not callable, or another function has this task's name.
        """
        if not callable(func):
            raise ConfigurationError(f"@app.task needs a function, got {type(func).__name__}")
        task_name = name or func.__name__
        existing = self.registry.get(task_name)
        if existing is not None and existing.func is not None and function_ref(existing.func) != function_ref(func):
            raise ConfigurationError(
                f"two tasks are named {task_name!r} ({existing.func.__qualname__} and {func.__qualname__}); "
                "pass name=... to tell them apart"
            )
        task: Task[Any, Any] = Task(self, task_name, func, options)
        self.registry[task_name] = task
        self._serve_late(options.queue)
        return task

    def remote(
        self,
        name: str,
        *,
        queue: str = DEFAULT_TASK_QUEUE,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> Task[Any, Any]:
        """A handle on a task that only workers know, to ``submit``/``map`` it by name (funcX-style)."""
        if not name:
            raise ConfigurationError("remote(name): the task name must not be empty")
        options = TaskOptions(queue=queue, retries=retries or 0, timeout=timeout)
        task: Task[Any, Any] = Task(self, name, None, options)
        return task

    def _serve_late(self, queue: str) -> None:
        """A task registered after start (a notebook cell) gets its queue served too."""
        worker = self.worker
        loop = self._loop
        if worker is None or loop is None or (self.worker_config is not None and self.worker_config.queues):
            return
        if queue in worker.consumers:
            return
        asyncio.run_coroutine_threadsafe(worker.serve(queue), loop)

    # -- the loop ------------------------------------------------------------------------------------

    def in_loop_thread(self) -> bool:
        """True when called on the thread that runs the App's loop."""
        return self._loop_thread_id is not None and threading.get_ident() == self._loop_thread_id

    def ensure_loop(self) -> asyncio.AbstractEventLoop:
        """The App's running loop; starts the App on a background thread if nobody started it."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._start_lock:
            if self._loop is None:
                shared = background_loop()
                if threading.current_thread() is shared.thread:
                    raise RuntimeError(
                        "an App used from a done-callback of another App must be started first ('async with app')"
                    )
                shared.run(self.context.start())
                self._owned = shared
                _OWNED.add(self)
            assert self._loop is not None
            return self._loop

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the App's loop (at once if already on it)."""
        loop = self.ensure_loop()
        if self.in_loop_thread():
            callback(*args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    def close(self, grace: float | None = None) -> None:
        """Stop an App that started itself on the background loop (no-op otherwise)."""
        owned = self._owned
        if owned is None:
            return
        self._stop_grace = grace
        try:
            if self._loop is not None and owned.thread.is_alive():
                owned.run(self.context.stop(), timeout=(grace or 0) + 60.0)
        finally:
            self._owned = None
            _OWNED.discard(self)
            self._stop_grace = None

    # -- Component -----------------------------------------------------------------------------------

    async def start(self, context: AppContext, /) -> None:
        """Bind to ``context`` and the running loop; start in-process workers when this App runs tasks."""
        self.context = self.client.context = context
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        if self.runs_workers():
            config = self.worker_config or WorkerConfig(
                concurrency=context.settings.concurrency,
                max_processes=os.cpu_count() or 1,
                shutdown_grace=context.settings.shutdown_grace,
            )
            self.worker = TaskWorker(self, context, config)
            await self.worker.start()

    async def stop(self) -> None:
        """Stop workers (running calls get their grace), the client, and the store."""
        try:
            if self.worker is not None:
                await self.worker.stop(self._stop_grace)
                self.worker = None
            await self.client.stop()
            if self._store is not None and not isinstance(self._store, MemoryResultStore):
                await self._store.close()  # reopened on demand; a memory store keeps its records
                self._store = None
        finally:
            self._loop = None
            self._loop_thread_id = None

    # -- submitting and asking -----------------------------------------------------------------------

    def submit_calls(
        self, task: Task[Any, Any], calls: Sequence[tuple[Sequence[Any], dict[str, Any]]], chunksize: int
    ) -> list[TaskFuture[Any]]:
        """Used by :meth:`Task.submit` and :meth:`Task.map`."""
        self.ensure_loop()
        return self.client.submit_calls(task, calls, chunksize)

    def get_task(self, task_id: str) -> TaskInfo:
        """Status, timestamps and outcome of ``task_id`` from the result store (any client, any thread).

        Raises:
            TaskNotFound: the store has no record (never submitted, or expired after ``result_ttl``).
        """
        info = self.store.get(task_id)
        if info is None or not info.done:
            # A worker writes the record while its reply travels: this client may hold an outcome the store
            # shows a moment later (read-your-writes for the submitter), or a record not written yet.
            entry = self.client.local_info_by_id(task_id)
            if entry is not None and (info is None or entry.done):
                return entry
        if info is None:
            raise TaskNotFound(
                f"no task {task_id!r} in the result store {self.store!r} "
                "(never submitted there, or its record expired after result_ttl)"
            )
        return info

    def cancel_task(self, task_id: str) -> bool:
        """Cancel a queued task by id from any client; ``False`` if it is running or finished."""
        future = self.client.future_by_id(task_id)
        if future is not None:
            return future.cancel()
        return self.store.try_cancel(task_id)

"""The user's entry point: ``App(broker=URL)``, ``@app.consumer`` and ``@app.task``.

Example:
    >>> app = App()  # the embedded memory broker
    >>> @app.consumer("numbers", publish_to="squares")
    ... def square(n: int) -> int:
    ...     return n * n
    >>> @app.task
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> with app:
    ...     add.submit(2, 3).result()
    5

``async with app:`` connects, runs ``@app.on_startup`` hooks, declares queues and starts every consumer
(and, on the memory broker, the task workers); leaving the block stops them cleanly. ``app.run()`` does the
same and blocks until SIGTERM or SIGINT. Sync code may simply ``submit``: an App nobody started starts
itself on a background thread (``with app:`` or ``app.close()`` stops it; so does interpreter exit).

The task machinery lives in :mod:`taskstream.tasks`; the App only delegates to ``app.tasks``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, Unpack, get_type_hints, overload

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from taskstream.brokers.base import Broker
from taskstream.config_check import check_broker_url, claim_check_from_settings, open_state_store
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.context import AppContext
from taskstream.errors import BrokerConnectionError, ConfigurationError, ValidationFailed
from taskstream.messages import Envelope, short_errors
from taskstream.observe.metrics import Recorder, attach, resolve
from taskstream.producer import Producer
from taskstream.settings import Settings, env_name, redact_url
from taskstream.tasks.registry import DEFAULT_TASK_QUEUE, TaskParams, task_options
from taskstream.tasks.runtime import TaskRuntime

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from taskstream.tasks.registry import Task
    from taskstream.tasks.stores.base import ResultStore, TaskInfo

__all__ = ["App", "Component", "ConsumerSpec"]

log = logging.getLogger("taskstream.app")

Hook = Callable[[], Any]
F = TypeVar("F", bound=Callable[..., Any])


class Component(Protocol):
    """Something with a lifecycle that hangs off an App (task workers, pipelines, services).

    ``start`` receives the App's :class:`~taskstream.context.AppContext` (its broker, producer, settings,
    metrics), not the App.
    """

    async def start(self, context: AppContext, /) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class ConsumerSpec:
    """A function registered with ``@app.consumer``."""

    queue: str
    func: Callable[..., Any]
    publish_to: str | None
    config: ConsumerConfig
    body_adapter: TypeAdapter[Any] | None
    message_param: str | None
    is_async: bool


class App:
    """Holds a broker, consumers and lifecycle hooks.

    Args:
        broker: a URL, a ``Broker`` instance, or ``None`` for ``TASKSTREAM_BROKER_URL`` (memory by default).
        settings: settings; read from the environment when omitted.
        result_store: where task status and results live: a URL (``memory://``, ``sqlite:///file.db``,
            ``redis://host:6379/0``) or a store; by default ``TASKSTREAM_RESULT_STORE_URL``, else memory on
            the memory broker and a SQLite file under ``~/.cache/taskstream`` on real brokers.
        workers: run task workers in this process; ``None`` means yes on the memory broker and no on real
            brokers (where ``taskstream worker`` runs them).
        metrics: Prometheus metrics of everything this app reads and publishes (:mod:`taskstream.observe.metrics`):
            ``False`` (default) off, ``True`` into a registry of the app's own (``app.metrics.registry``), or a
            ``prometheus_client.CollectorRegistry`` of yours. Needs ``pip install 'taskstream[metrics]'``.
    """

    def __init__(
        self,
        broker: str | Broker | None = None,
        *,
        settings: Settings | None = None,
        result_store: str | ResultStore | None = None,
        workers: bool | None = None,
        metrics: bool | CollectorRegistry | Recorder = False,
    ) -> None:
        self.settings = settings or Settings()
        self._broker_setting: str | None = None
        """Where the broker URL came from, for errors (``None`` for a Broker instance)."""
        if isinstance(broker, Broker):
            self.broker = broker
            self.broker_url = f"<{type(broker).__name__}>"
        else:
            url = broker or self.settings.broker_url.get_secret_value()
            self._broker_setting = "App(broker=...)" if broker else env_name("broker_url")
            self.broker = check_broker_url(url, name=self._broker_setting, settings=self.settings)
            self.broker_url = redact_url(url)
        self.metrics: Recorder = resolve(metrics)
        """Where this app's metrics go (a no-op recorder when off)."""
        if self.metrics.enabled:
            attach(self.broker, self.metrics)  # every intake and producer on this broker records into it
        self._depth_poller: asyncio.Task[None] | None = None
        self.producer = Producer(
            self.broker,
            max_message_bytes=self.settings.max_message_bytes,
            claim_check=claim_check_from_settings(self.settings),
        )
        self.specs: list[ConsumerSpec] = []
        self.consumers: list[Consumer] = []
        self.components: list[Component] = []
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._started = False
        self._stop_requested: asyncio.Event | None = None
        self.failure: str | None = None
        """Why :meth:`serve` stopped by itself (a consumer's broker failed for good), or ``None``."""
        self.context = AppContext(
            broker=self.broker,
            producer=self.producer,
            settings=self.settings,
            metrics=self.metrics,
            result_store=result_store,
            start=self.start,
            stop=self.stop,
        )
        """What the task runtime and components get of this App (rebuilt when metrics are turned on)."""
        self.tasks = TaskRuntime(self.context, workers=workers)
        self.components.append(self.tasks)

    # -- registration ---------------------------------------------------------------------------------

    def consumer(
        self,
        queue: str,
        *,
        publish_to: str | None = None,
        prefetch: int | None = None,
        concurrency: int | None = None,
        max_attempts: int | None = None,
        dead_letter: str | None = None,
        handler_timeout: float | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Make a function a consumer of ``queue``; its return value (unless ``None``) goes to ``publish_to``.

        The first parameter receives the message body, validated against its annotation (pydantic model,
        dataclass, JSON types; unannotated means any JSON value). A parameter annotated ``Message`` receives
        the envelope and delivery. Sync functions run on a thread pool, async ones on the loop.
        """
        config = ConsumerConfig(
            prefetch=prefetch or self.settings.prefetch,
            concurrency=concurrency or self.settings.concurrency,
            max_attempts=max_attempts or self.settings.max_attempts,
            dead_letter=dead_letter,
            shutdown_grace=self.settings.shutdown_grace,
            handler_timeout=handler_timeout,
        )

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            adapter, message_param = _inspect_handler(func)
            self.specs.append(
                ConsumerSpec(
                    queue=queue,
                    func=func,
                    publish_to=publish_to,
                    config=config,
                    body_adapter=adapter,
                    message_param=message_param,
                    is_async=inspect.iscoroutinefunction(func),
                )
            )
            return func

        return register

    @overload
    def on_startup(self, func: Hook, /) -> Hook: ...

    @overload
    def on_startup(
        self, func: None = None, /, *, scope: Literal["all", "main", "processes"] = "all"
    ) -> Callable[[Hook], Hook]: ...

    def on_startup(
        self, func: Hook | None = None, /, *, scope: Literal["all", "main", "processes"] = "all"
    ) -> Hook | Callable[[Hook], Hook]:
        """Run ``func`` (sync or async) once per process that runs work: load models here.

        ``scope="all"`` (default): in this process when the app starts, before any consumer, and once in each
        worker process of ``cpu_bound`` tasks before it takes work (if ``func`` is defined at module level).
        ``scope="main"``: only here. ``scope="processes"``: only in worker processes (a model only
        ``cpu_bound`` tasks use need not load in the process that merely feeds them).
        """
        if scope not in ("all", "main", "processes"):
            raise ConfigurationError(f"on_startup scope must be 'all', 'main' or 'processes', got {scope!r}")

        def register(hook: Hook) -> Hook:
            if scope in ("all", "main"):
                self._startup.append(hook)
            if scope in ("all", "processes"):
                self.tasks.add_process_hook(hook, required=scope == "processes")
            return hook

        return register(func) if func is not None else register

    def on_shutdown(self, func: Hook) -> Hook:
        """Run ``func`` once when the app stops, after every consumer stopped."""
        self._shutdown.append(func)
        return func

    def enable_metrics(self, metrics: bool | CollectorRegistry | Recorder = True) -> Recorder:
        """Turn metrics on for an App built without them (the CLI does, for ``--health-port``); before start.

        Returns:
            The recorder (``app.metrics``); one already on is kept.
        """
        if not self.metrics.enabled:
            self.metrics = resolve(metrics)
            if self.metrics.enabled:
                attach(self.broker, self.metrics)
                self.producer.metrics = self.metrics
                self.context = replace(self.context, metrics=self.metrics)  # components get it at start
        return self.metrics

    def add_component(self, component: Component) -> None:
        """Attach something with ``start(context)``/``stop()`` to this app's lifecycle (see :class:`Component`)."""
        self.components.append(component)

    # -- tasks (the machinery is in taskstream.tasks) -------------------------------------------------

    @overload
    def task(self, func: F, /) -> Task[Any, Any]: ...

    @overload
    def task(self, func: None = None, /, **params: Unpack[TaskParams]) -> Callable[[F], Task[Any, Any]]: ...

    def task(
        self, func: F | None = None, /, **params: Unpack[TaskParams]
    ) -> Task[Any, Any] | Callable[[F], Task[Any, Any]]:
        """Make a sync or async function a task: ``f.submit(...)`` returns a :class:`~taskstream.TaskFuture`.

        ``@app.task`` or ``@app.task(...)`` with these keywords (:class:`~taskstream.tasks.registry.TaskParams`;
        defaults from :class:`~taskstream.tasks.TaskOptions`):

        Args:
            name: the name workers know it by (default: the function's ``__name__``).
            queue: the queue its calls go to (default ``"tasks"``).
            retries: retries after a failure (default 0; requeued with backoff from ``retry_delay`` seconds,
                default 0.5).
            timeout: seconds a call may run (async: cancelled; ``cpu_bound``: process killed; sync thread:
                abandoned); ``None`` (default) for no limit.
            cpu_bound: run in worker processes so all cores are used (the function must be module-level).
            ship_code: send the function's source, HMAC-signed with ``settings.signing_key``, so workers
                that do not have it can run it; workers refuse anything unsigned.

        Raises:
            TypeError: a keyword it does not take (the message names the ones it does).
            ConfigurationError: an option out of range, or two functions under one task name.
        """
        name, options = task_options(params)  # a bad option fails here, before any function is given

        def register(fn: F) -> Task[Any, Any]:
            return self.tasks.register(fn, name, options)

        return register(func) if func is not None else register

    def remote(
        self, name: str, *, queue: str = DEFAULT_TASK_QUEUE, retries: int | None = None, timeout: float | None = None
    ) -> Task[Any, Any]:
        """A task known only by name to this client (it runs on workers that registered it): ``.submit``/``.map``."""
        return self.tasks.remote(name, queue=queue, retries=retries, timeout=timeout)

    def get_task(self, task_id: str) -> TaskInfo:
        """Status (pending/running/success/failed/cancelled), timestamps and outcome of any task by id.

        Works from any client and thread, without starting the App. Raises ``TaskNotFound`` if unknown.
        """
        return self.tasks.get_task(task_id)

    def cancel_task(self, task_id: str) -> bool:
        """Cancel a queued task by id (from any client); ``False`` if it already runs or finished."""
        return self.tasks.cancel_task(task_id)

    def close(self) -> None:
        """Stop an App that started itself for sync callers (after ``submit`` from plain code)."""
        self.tasks.close()

    def __enter__(self) -> Self:
        self.tasks.ensure_loop()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.tasks.close()

    # -- publishing -----------------------------------------------------------------------------------

    async def publish(
        self,
        queue: str,
        body: Any,
        *,
        key: str | None = None,
        kind: str = "record",
        headers: dict[str, Any] | None = None,
        event_time: float | None = None,
    ) -> str:
        """Publish ``body`` to ``queue`` in an envelope; returns the message id."""
        envelope = Envelope.model_validate(
            {"kind": kind, "body": body, "key": key, "headers": headers or {}, "event_time": event_time}
        )
        await self.producer.send(queue, envelope)
        return envelope.id

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, run startup hooks, start consumers and components.

        If any step fails, what already started is stopped and the broker is closed before the error is
        raised: a failed start leaves no consumer pulling messages and no connection open.
        """
        if self._started:
            return
        await self.check_configuration()
        try:
            await self.broker.connect()
        except BrokerConnectionError as exc:
            if self._broker_setting is None:
                raise
            raise BrokerConnectionError(f"{self._broker_setting}: {exc}") from exc  # a wrong host or port
        started: list[Component] = []
        try:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                max_workers=max([s.config.concurrency for s in self.specs if not s.is_async] or [1]),
                thread_name_prefix="taskstream-handler",
            )
            for hook in self._startup:
                await _call_hook(hook)
            for spec in self.specs:
                if spec.publish_to:
                    await self.broker.declare(spec.publish_to)
                consumer = Consumer(
                    self.broker,
                    spec.queue,
                    self._make_handler(spec),
                    spec.config,
                    claim_check=self.producer.claim_check,
                    max_message_bytes=self.settings.max_message_bytes,
                )
                await consumer.start()
                self.consumers.append(consumer)
            for component in self.components:
                started.append(component)  # stopped on failure too: its start may have got half-way
                await component.start(self.context)
        except BaseException:
            await self._undo_start(started)
            raise
        self._started = True
        if self.metrics.enabled:
            self._depth_poller = asyncio.create_task(self.metrics.poll_depths(self.broker), name="taskstream:depths")
        worker = self.tasks.worker
        log.info(
            "app started on %s with %d consumer(s), %d task(s)%s",
            self.broker_url,
            len(self.consumers),
            len(self.tasks.registry),
            f", serving task queue(s) {', '.join(worker.queues)}" if worker is not None and worker.queues else "",
        )

    async def check_configuration(self) -> None:
        """Open the result store and check the state store URL, before anything connects or takes work.

        The broker and payload store URLs were checked when the App was built. :meth:`start` calls this;
        ``taskstream worker`` and ``run`` call it before they announce themselves.

        Raises:
            ConfigurationError: led by the setting's name, e.g. ``TASKSTREAM_RESULT_STORE_URL: unknown result
                store URL scheme 'foo' in 'foo://x' (known: memory, sqlite, redis)``.
        """
        self.tasks.open_store()
        if self.settings.state_url is not None:
            await open_state_store(None, self.settings).close()  # parsed and built; opened when a stage runs

    async def stop(self) -> None:
        """Stop components and consumers (finishing in-flight work), run shutdown hooks, close."""
        if not self._started:
            return
        self._started = False
        if self._depth_poller is not None:
            self._depth_poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._depth_poller
            self._depth_poller = None
        for component in reversed(self.components):
            await component.stop()
        await asyncio.gather(*(consumer.stop() for consumer in self.consumers))
        self.consumers.clear()
        for hook in self._shutdown:
            await _call_hook(hook)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        await self.broker.close()

    async def _undo_start(self, started: list[Component]) -> None:
        """Stop what a failed :meth:`start` had started and close the broker; cleanup errors are only logged."""
        for component in reversed(started):
            try:
                await component.stop()
            except Exception as exc:
                log.warning("while undoing a failed start: stopping %r failed: %s", component, exc)
        consumers, self.consumers = list(self.consumers), []
        for result in await asyncio.gather(*(c.stop(grace=0) for c in consumers), return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("while undoing a failed start: stopping a consumer failed: %s", result)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None
        try:
            await self.broker.close()
        except Exception as exc:
            log.warning("while undoing a failed start: closing the broker failed: %s", exc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def serve(self) -> None:
        """Start, block until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop_requested.set)
        await self.start()
        watchdog = asyncio.create_task(self._watch_consumers(), name="taskstream:watchdog")
        try:
            await self._stop_requested.wait()
            log.info("stopping: finishing in-flight work")
        finally:
            watchdog.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        """Ask :meth:`serve` to stop (thread-unsafe; call from the app's loop)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    def run(self) -> None:
        """Run until SIGTERM or SIGINT; exits cleanly after in-flight work is finished or requeued.

        Raises:
            SystemExit: with code 1 when a consumer stopped by itself (its broker failed for good), so a
                supervisor (systemd, Kubernetes, compose ``restart: on-failure``) starts the process again.
        """
        asyncio.run(self.serve())
        if self.failure is not None:
            raise SystemExit(1)

    def all_consumers(self) -> list[Consumer]:
        """Every consumer this app runs: its own and those of its components (task workers, pipelines)."""
        found: list[Consumer] = list(self.consumers)
        for component in self.components:
            owned = getattr(component, "consumers", None)
            if owned is None:
                owned = getattr(getattr(component, "worker", None), "consumers", None)
            if isinstance(owned, dict):
                owned = list(owned.values())
            found.extend(c for c in owned or () if isinstance(c, Consumer))
        return found

    async def _watch_consumers(self, interval: float = 1.0) -> None:
        """Stop the app when a consumer stopped by itself, instead of idling with nothing consumed."""
        while True:
            await asyncio.sleep(interval)
            failed = [c for c in self.all_consumers() if c.failure is not None]
            if failed:
                self.failure = "; ".join(f"consumer on {c.queue!r}: {c.failure}" for c in failed)
                log.error("stopping the app: %s", self.failure)
                self.request_stop()
                return

    # -- internals ------------------------------------------------------------------------------------

    def _make_handler(self, spec: ConsumerSpec) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            envelope = message.envelope
            body = envelope.body
            if spec.body_adapter is not None:
                try:
                    body = spec.body_adapter.validate_python(body)
                except PydanticValidationError as exc:
                    raise ValidationFailed(
                        f"body does not match {spec.func.__qualname__}'s annotation: {short_errors(exc, '<body>')}"
                    ) from exc
            kwargs = {spec.message_param: message} if spec.message_param else {}
            if spec.is_async:
                result = await spec.func(body, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._threads, functools.partial(spec.func, body, **kwargs))
            if spec.publish_to is not None and result is not None:
                await self.producer.send(
                    spec.publish_to,
                    Envelope(
                        kind="record",
                        body=result,
                        key=envelope.key,
                        correlation_id=envelope.id,
                        event_time=envelope.event_time,
                    ),
                )

        return handle


def _inspect_handler(func: Callable[..., Any]) -> tuple[TypeAdapter[Any] | None, str | None]:
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    if not params:
        raise ConfigurationError(f"consumer {func.__qualname__} must take the message body as its first parameter")
    try:
        hints = get_type_hints(func)
    except Exception as exc:
        raise ConfigurationError(f"cannot resolve the annotations of {func.__qualname__}: {exc}") from exc
    message_param = next((p.name for p in params[1:] if hints.get(p.name) is Message), None)
    body_hint = hints.get(params[0].name)
    adapter = TypeAdapter(body_hint) if body_hint is not None and body_hint is not Any else None
    return adapter, message_param


async def _call_hook(hook: Hook) -> None:
    result = hook()
    if inspect.isawaitable(result):
        await result

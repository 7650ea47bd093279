"""Request/reply to a single-owner service (an instrument that only one process may drive).

A :class:`Service` owns a device and answers requests on the queue ``service-<name>``, one at a time, so access
to the device is serialised however many clients ask at once. Only one process may own it: the service holds
an exclusive lock file while it runs (a second one fails to start with a clear error). ``quit`` ends it.

A :class:`ServiceClient` (or a pipeline step, ``stream.request("camera")``) sends a request with a private
reply queue and a correlation id and awaits the reply; pending calls are futures keyed by correlation id,
removed when they complete, and all failed loudly when the client closes. A request whose caller has given up
(past its deadline) is skipped by the service.

========================  =========================================================================
Message                   Shape
========================  =========================================================================
request                   envelope ``kind="task"``, ``reply_to``, ``deadline``, body = the request
reply                     envelope ``kind="result"``, ``correlation_id`` = request id,
                          body ``{"ok": true, "result": ...}`` or ``{"ok": false, "error", "type"}``
========================  =========================================================================

Requests and replies too large for the broker (a camera frame on Azure Queues) travel by reference
(claim-check, :mod:`taskstream.payloads`): the producer offloads them, the reader resolves the reference and
deletes the blob after the ack. Requests and replies are read through the :mod:`intake <taskstream.intake>`:
an unreadable request goes to ``service-<name>.dlq``, an unreadable reply to the shared reply dead-letter queue
(:func:`~taskstream.intake.reply_dead_letter_queue`); a reply that cannot be sent is retried, then dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from taskstream.brokers.base import Broker, Subscription
from taskstream.errors import BrokerConnectionError, ConfigurationError
from taskstream.intake import Intake, IntakeStats, Opened, reply_dead_letter_queue
from taskstream.messages import Envelope, new_id
from taskstream.payloads.claimcheck import ClaimCheck
from taskstream.producer import Producer
from taskstream.stream_ops.core import BatchOp, is_async_callable
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.tasks.errors import error_from_data

if TYPE_CHECKING:
    from taskstream.app import App
    from taskstream.context import AppContext

__all__ = ["Service", "ServiceClient", "request_op", "service_queue"]

log = logging.getLogger("taskstream.stream_ops.service")

QUIT = "quit"


def service_queue(name: str) -> str:
    """The request queue of service ``name``."""
    return f"service-{name}"


class Service:
    """Answers requests for ``name`` with ``handler(request) -> reply`` (sync handlers run on a worker thread).

    Args:
        name: the service name clients call.
        handler: sync or async; its return value is the reply; an exception becomes an error reply.
        lock_path: the ownership lock file (default: ``<tmp>/taskstream-service-<name>.lock``); ``False`` for none.
        quit_command: a request ``{"command": <this>}`` replies and stops the service; ``None`` disables it.
        claim_check: where requests and replies too large for the broker go (default: from settings).

    Use as an App component (``app.add_component(service)``) or ``await service.run(broker)``.
    """

    def __init__(
        self,
        name: str,
        handler: Callable[[Any], Any],
        *,
        lock_path: str | os.PathLike[str] | bool | None = None,
        quit_command: str | None = QUIT,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        if not name:
            raise ConfigurationError("a Service needs a name")
        self.name = name
        self.claim_check = claim_check
        self.queue = service_queue(name)
        self.handler = handler
        self.is_async = is_async_callable(handler)
        if lock_path is False:
            self.lock_path: Path | None = None
        elif lock_path in (None, True):
            self.lock_path = Path(tempfile.gettempdir()) / f"taskstream-service-{name}.lock"
        else:
            self.lock_path = Path(str(lock_path))
        self.quit_command = quit_command
        self.handled = 0
        self.errors = 0
        self.skipped_expired = 0
        self.stats = IntakeStats()
        self.in_handler = 0
        self.max_in_handler = 0
        self.stopped = asyncio.Event()
        self._lock_fd: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None

    def _acquire(self) -> None:
        if self.lock_path is None:
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigurationError(
                f"service {self.name!r} is already owned by another process (lock {self.lock_path} is held)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    async def start(self, app: AppContext | App | Broker) -> None:
        """Take ownership and start answering in the background on a broker, or an App's (component protocol).

        Args:
            app: a broker, the :class:`~taskstream.context.AppContext` an App passes its components, or an App.
        """
        broker = app if isinstance(app, Broker) else app.broker
        self._acquire()
        try:
            await broker.declare(self.queue)
            self._subscription = broker.consume(self.queue, prefetch=1)
        except BaseException:
            self._release()
            raise
        self.stopped.clear()
        self._task = asyncio.create_task(self._serve(broker, self._subscription), name=f"service:{self.name}")

    async def stop(self) -> None:
        """Stop answering (a request being handled finishes first); release ownership."""
        if self._task is not None and not self._task.done():
            if self._subscription is not None:
                await self._subscription.close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._release()
        self.stopped.set()

    async def run(self, broker: Broker) -> None:
        """Serve until ``quit`` (or cancellation)."""
        await self.start(broker)
        try:
            await self.stopped.wait()
        finally:
            await self.stop()

    async def _serve(self, broker: Broker, subscription: Subscription) -> None:
        producer = Producer(broker, claim_check=self.claim_check)
        intake = Intake(broker, self.queue, claim_check=producer.claim_check, stats=self.stats)
        try:
            async for delivery in subscription:
                opened = await intake.open(delivery)  # unreadable requests are dead-lettered there
                if opened is None:
                    continue
                try:
                    quitting = await self._answer(producer, opened)
                except Exception as exc:  # the reply could not be sent: try again later, then dead-letter
                    reason = f"{type(exc).__name__}: {exc}"
                    log.warning("service %r: could not answer request %s: %s", self.name, delivery.message_id, reason)
                    await intake.retry_or_dead_letter(delivery, reason, envelope=opened.envelope)
                    continue
                await intake.settle_quietly(delivery.ack())
                if opened.ref is not None:
                    await producer.claim_check.release(opened.ref)
                if quitting:
                    log.info("service %r: quit after %d requests", self.name, self.handled)
                    break
        finally:
            self.stopped.set()
            await subscription.close()

    async def _answer(self, producer: Producer, opened: Opened) -> bool:
        """Handle one request and send its reply; True when it was the quit command."""
        request = opened.envelope
        assert request is not None
        if request.deadline is not None and request.deadline < time.time():
            self.skipped_expired += 1
            return False
        body = request.body
        quitting = self.quit_command is not None and isinstance(body, dict) and body.get("command") == self.quit_command
        if quitting:
            reply: dict[str, Any] = {"ok": True, "result": {"quit": True, "handled": self.handled}}
        else:
            reply = await self._handle(body)
        if request.reply_to:
            await producer.send(request.reply_to, Envelope(kind="result", correlation_id=request.id, body=reply))
        return quitting

    async def _handle(self, body: Any) -> dict[str, Any]:
        self.in_handler += 1
        self.max_in_handler = max(self.max_in_handler, self.in_handler)
        try:
            if self.is_async:
                result = await self.handler(body)
            else:
                result = await asyncio.to_thread(functools.partial(self.handler, body))
            self.handled += 1
            return {"ok": True, "result": result}
        except Exception as exc:
            self.errors += 1
            log.warning("service %r: request failed: %s: %s", self.name, type(exc).__name__, exc)
            return {
                "ok": False,
                "type": type(exc).__name__,
                "error": str(exc),
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-4:]),
            }
        finally:
            self.in_handler -= 1


class ServiceClient:
    """Calls services over ``broker`` and awaits replies on a private reply queue.

    Example:
        >>> async def example(broker):
        ...     async with ServiceClient(broker) as client:
        ...         frame = await client.call("camera", {"command": "take_picture"}, timeout=5)
    """

    def __init__(
        self, broker: Broker, *, reply_queue: str | None = None, claim_check: ClaimCheck | None = None
    ) -> None:
        self.broker = broker
        self.reply_queue = reply_queue or f"reply-{new_id()[:16]}"
        self.producer = Producer(broker, claim_check=claim_check)
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if self._task is not None:
            return
        await self.broker.declare(self.reply_queue)
        self._subscription = self.broker.consume(self.reply_queue, prefetch=256)
        self._task = asyncio.create_task(self._receive(self._subscription), name=f"replies:{self.reply_queue}")

    async def _receive(self, subscription: Subscription) -> None:
        check = self.producer.claim_check
        intake = Intake(
            self.broker, self.reply_queue, claim_check=check, dead_letter_queue=reply_dead_letter_queue(self.broker)
        )
        try:
            async for delivery in subscription:
                opened = await intake.open(delivery)  # an unreadable reply is dead-lettered there
                if opened is None:
                    continue
                reply = opened.envelope
                assert reply is not None
                future = self._pending.get(reply.correlation_id or "")
                if future is not None and not future.done():
                    future.set_result(reply.body)
                await intake.settle_quietly(delivery.ack())  # a reply nobody waits for (timed out) ends here
                if opened.ref is not None:
                    await check.release(opened.ref)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail_all(BrokerConnectionError(f"reply queue {self.reply_queue!r} failed: {exc}"))

    def _fail_all(self, exc: BaseException) -> None:
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def call(self, service: str, body: Any, *, timeout: float = 30.0) -> Any:
        """Send ``body`` to ``service`` and return its reply's result.

        Raises:
            TimeoutError: no reply within ``timeout`` seconds (the service skips the request once it is due).
            TaskError: the service's handler raised; carries its type and traceback. When that type is a
                built-in one, the error is also an instance of it (``except ValueError`` catches it), as
                with task futures.
            BrokerConnectionError: the client was closed while waiting.
        """
        if self._closed:
            raise BrokerConnectionError("this ServiceClient is closed")
        await self.start()
        request = Envelope(kind="task", reply_to=self.reply_queue, deadline=time.time() + timeout, body=body)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = future
        request_id = request.id

        def forget(_future: asyncio.Future[Any]) -> None:
            self._pending.pop(request_id, None)

        future.add_done_callback(forget)
        queue = service_queue(service)
        await self.broker.declare(queue)
        await self.producer.send(queue, request)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"service {service!r} did not reply within {timeout} s") from None
        if isinstance(reply, dict) and reply.get("ok") is False:
            raise error_from_data(
                {
                    "type": reply.get("type", ""),
                    "message": reply.get("error", "service error"),
                    "traceback": reply.get("traceback", ""),
                }
            )
        return reply.get("result") if isinstance(reply, dict) else reply

    async def close(self) -> None:
        """Fail pending calls, stop receiving and delete the reply queue."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(BrokerConnectionError("ServiceClient closed while waiting for a reply"))
        if self._subscription is not None:
            await self._subscription.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.broker.delete_queue(self.reply_queue)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def request_op(service: str, timeout: float) -> Callable[[RuntimeContext], BatchOp]:
    """The ``stream.request(service)`` step: each item is sent to the service; its reply moves on."""

    def build(ctx: RuntimeContext) -> BatchOp:
        holder: list[ServiceClient] = []

        def client() -> ServiceClient:
            if not holder:
                if ctx.broker is None:
                    raise ConfigurationError(f"request({service!r}) needs the pipeline to run on a broker")
                holder.append(ServiceClient(ctx.broker, claim_check=ctx.payloads()))
            return holder[0]

        async def call(items: list[Any]) -> list[Any]:
            c = client()
            return list(await asyncio.gather(*(c.call(service, item, timeout=timeout) for item in items)))

        async def close() -> None:
            if holder:
                await holder[0].close()

        return BatchOp(call, None, is_async=True, close=close)

    return build

"""The executing side: consume task queues, run each call the way it asks, store and reply.

For every task message (through the shared consumer runtime, so malformed messages are dead-lettered and
shutdown is graceful):

1. Parse the request; find the function by name in the App's registry, or load verified shipped code.
   A request the worker cannot run (malformed, unknown name, unsigned, badly signed or expired code) is
   answered ``failed`` with :class:`TaskRefused` and dead-lettered with the reason. The refusal is recorded
   in the result store unless that would overwrite a final record or another submitter's record; the
   answer goes out even when the store cannot be written.
2. *Claim* it in the result store: a task cancelled while queued, or already finished (a duplicate
   delivery), is not run again; the stored outcome is sent back instead, but only to the reply queue that
   submitted it. A message reusing another submitter's task id is refused without a word about that task.
3. Run it: async functions on the loop, sync ones on a thread pool, ``cpu_bound`` ones in a worker
   process (:mod:`taskstream.tasks.pool`).
4. On an exception, while attempts remain (``retries``), record ``pending`` and requeue with backoff;
   otherwise record ``failed`` with the remote type, message and traceback. Store the outcome and publish
   it to the client's reply queue at the same time, then ack once both are done. Replies due to one client
   while a reply to it is being published go together, as one bundle (:class:`taskstream.bundles.Coalescer`).

Task messages may arrive bundled (:mod:`taskstream.bundles`): the consumer runtime hands each call over as a
delivery of its own, so everything below holds per call.

Timeouts (``timeout=`` seconds from the moment the call starts running):

==================  ===================================================================================
How the task runs   At its timeout
==================  ===================================================================================
async function      cancelled (``CancelledError`` raised inside it), reported as ``TaskTimeout``
``cpu_bound``       its worker process is killed and replaced, reported as ``TaskTimeout``
sync on a thread    abandoned: ``TaskTimeout`` is reported at once, the thread runs to the end in the
                    background (Python cannot kill a thread) and its result is discarded
==================  ===================================================================================

A timed-out call counts as a failure: it is retried while ``retries`` allow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError as PydanticValidationError

from taskstream.brokers.base import Delivery, OutgoingMessage
from taskstream.bundles import Coalescer, bundle_limit
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import MessageTooLarge, Reject, Retry
from taskstream.messages import Envelope, header_str, short_errors
from taskstream.producer import broker_headers
from taskstream.tasks.errors import TaskRefused, TaskTimeout, error_to_data
from taskstream.tasks.pool import DEFAULT_IDLE_TIMEOUT, ProcessPool, Target, run_items
from taskstream.tasks.protocol import TaskRequest, load_shipped, new_task_id, reply_body, verify_request
from taskstream.tasks.registry import MAX_RETRIES, TaskOptions, function_ref
from taskstream.tasks.stores.base import TaskInfo

if TYPE_CHECKING:
    from taskstream.context import AppContext
    from taskstream.tasks.runtime import TaskRuntime

__all__ = ["TaskWorker", "WorkerConfig"]

log = logging.getLogger("taskstream.tasks.worker")

MAX_RETRY_DELAY = 60.0
MAX_ANSWERED = 10_000  # deliveries remembered between a refusal and its dead-letter hook
DEPTH_INTERVAL = 0.5


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker serves task queues.

    Attributes:
        queues: queues to serve; ``None`` serves the queue of every registered task.
        concurrency: calls running at once (async, threads and waiting for a process together); raised to
            at least the process count so every process can be fed.
        prefetch: unacked messages held; ``None`` means ``max(settings.prefetch, concurrency)``.
        min_processes / max_processes: the worker-process pool for ``cpu_bound`` tasks; processes start
            on demand up to ``max_processes`` while calls wait (or the queue is deep) and stop after
            ``idle_timeout`` seconds idle, down to ``min_processes``.
        shutdown_grace: seconds running calls may finish on stop before they are requeued.
    """

    queues: tuple[str, ...] | None = None
    concurrency: int = 16
    prefetch: int | None = None
    min_processes: int = 0
    max_processes: int = os.cpu_count() or 1
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    shutdown_grace: float = 30.0


@dataclass(slots=True)
class _Runnable:
    name: str
    func: Callable[..., Any]
    target: Target | None  # how a worker process finds it; None: not possible
    is_async: bool
    cpu_bound: bool
    retries: int
    retry_delay: float
    timeout: float | None


class TaskWorker:
    """Serves task queues for one App (in-process on the memory broker, or under ``taskstream worker``).

    Args:
        runtime: the task runtime (its registry, result store, signing key and process hooks).
        context: the App's broker, producer, settings and metrics.
        config: how it serves (queues, concurrency, processes, grace).
    """

    def __init__(self, runtime: TaskRuntime, context: AppContext, config: WorkerConfig) -> None:
        self.runtime = runtime
        self.context = context
        self.config = config
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.consumers: dict[str, Consumer] = {}
        self.pool: ProcessPool | None = None
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._depth_task: asyncio.Task[None] | None = None
        self._key = runtime.signing_key()
        self._answered: set[tuple[str, str, int]] = set()  # deliveries refused (and answered) by handle
        # replies due together to one client go as one bundle
        self._replies = Coalescer(context.broker, bundle_limit(context.producer.inline_limit))

    @property
    def queues(self) -> list[str]:
        """The queues this worker serves now."""
        return sorted(self.consumers)

    async def start(self) -> None:
        """Start the process pool (``min_processes``), the thread pool and one consumer per queue."""
        config = self.config
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, config.concurrency), thread_name_prefix="taskstream-task"
        )
        self.pool = ProcessPool(
            min_size=config.min_processes,
            max_size=max(1, config.max_processes),
            idle_timeout=config.idle_timeout,
            hooks=self.runtime.process_hooks(),
        )
        await self.pool.start()
        queues = config.queues if config.queues is not None else self.runtime.task_queues()
        for queue in queues:
            await self.serve(queue)
        self._depth_task = asyncio.create_task(self._watch_depth(), name="taskstream-worker-depth")

    async def serve(self, queue: str) -> None:
        """Start consuming ``queue`` (no-op if served already)."""
        if queue in self.consumers:
            return
        settings = self.context.settings
        concurrency = max(self.config.concurrency, self.config.max_processes)
        consumer = Consumer(
            self.context.broker,
            queue,
            self.handle,
            ConsumerConfig(
                prefetch=self.config.prefetch or max(settings.prefetch, concurrency),
                concurrency=concurrency,
                max_attempts=MAX_RETRIES + settings.max_attempts + 1,
                shutdown_grace=self.config.shutdown_grace,
            ),
            claim_check=self.context.producer.claim_check,
            on_dead_letter=self._on_dead_letter,
        )
        self.consumers[queue] = consumer
        await consumer.start()

    async def stop(self, grace: float | None = None) -> None:
        """Stop consuming (running calls get ``grace`` seconds, then are requeued), then the pools."""
        if self._depth_task is not None:
            self._depth_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._depth_task
        await asyncio.gather(*(c.stop(grace) for c in self.consumers.values()))
        self.consumers.clear()
        if self.pool is not None:
            await self.pool.close(grace=5.0)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _watch_depth(self) -> None:
        """Grow the process pool while queues with cpu_bound work are deep."""
        broker = self.context.broker
        while True:
            await asyncio.sleep(DEPTH_INTERVAL)
            pool = self.pool
            if pool is None or pool.max_size <= pool.min_size or pool.busy + pool.waiting == 0:
                continue
            try:
                depth = sum([await broker.depth(q) for q in self.consumers])
            except Exception as exc:
                log.debug("cannot read queue depth: %s", exc)
                continue
            if depth:
                pool.want(depth)

    # -- one message ---------------------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Run one task message (the consumer runtime acks when this returns)."""
        envelope, delivery = message.envelope, message.delivery
        if envelope.kind != "task":
            raise Reject(f"not a task message (kind={envelope.kind!r})")
        task_id = envelope.id
        try:
            request = TaskRequest.model_validate(envelope.body)
        except PydanticValidationError as exc:
            error = TaskRefused(f"malformed task request: {short_errors(exc, '<body>')}")
            await self._refuse_and_reject(delivery, envelope, "", error)
        try:
            runnable = self._resolve(envelope, request)
        except TaskRefused as exc:
            await self._refuse_and_reject(delivery, envelope, request.task, exc)
        allowed = runnable.retries + 1 + self.context.settings.max_attempts
        if delivery.attempt > allowed:
            error = TaskRefused(f"delivered {delivery.attempt} times without finishing (the worker died each time?)")
            await self._refuse_and_reject(delivery, envelope, request.task, error)

        started = time.time()
        store = self.runtime.store
        reply_to = envelope.reply_to or ""
        blocker = await store.claim(
            task_id,
            name=request.task,
            queue=delivery.queue,
            worker=self.worker_id,
            started_at=started,
            reply_to=reply_to,
        )
        if blocker is not None:
            await self._blocked(delivery, envelope, blocker)
            return
        info = TaskInfo(
            task_id,
            name=request.task,
            queue=delivery.queue,
            status="running",
            submitted_at=envelope.created_at,
            started_at=started,
            attempts=delivery.attempt,
            worker=self.worker_id,
            reply_to=reply_to,
        )
        info.started_at = time.time()  # the call itself starts now (after the claim's commit): clients learn
        try:  # a task's run time from started_at..finished_at to size their bundles (tasks/bundling.py)
            value = await self._execute(runnable, request)
        except Exception as exc:
            info.error = error_to_data(exc)
            if delivery.attempt <= runnable.retries:
                info.status = "pending"
                await store.finish(info)
                delay = min(MAX_RETRY_DELAY, runnable.retry_delay * 2 ** (delivery.attempt - 1))
                raise Retry(f"{type(exc).__name__}: {exc}", delay=delay) from exc
            info.status = "failed"
        else:
            info.status = "success"
            info.result = value
        info.finished_at = time.time()
        await self._finish(envelope, info)

    def _resolve(self, envelope: Envelope, request: TaskRequest) -> _Runnable:
        if request.code is not None:
            code = verify_request(self._key, envelope.id, envelope.reply_to, request)
            func = load_shipped(code)
            opts = TaskOptions()
            retries = request.retries if request.retries is not None else opts.retries
            return _Runnable(
                name=request.task,
                func=func,
                target=("code", code.name, code.source, ""),  # stable across calls: processes cache by it
                is_async=asyncio.iscoroutinefunction(func),
                cpu_bound=bool(request.cpu_bound),
                retries=min(MAX_RETRIES, retries),
                retry_delay=request.retry_delay if request.retry_delay is not None else opts.retry_delay,
                timeout=request.timeout,
            )
        task = self.runtime.registry.get(request.task)
        if task is None or task.func is None:
            known = ", ".join(sorted(self.runtime.registry)) or "none"
            raise TaskRefused(f"no task named {request.task!r} on this worker (it knows: {known})")
        opts = task.options
        ref = function_ref(task.func)
        return _Runnable(
            name=task.name,
            func=task.func,
            target=("ref", *ref) if ref is not None else None,
            is_async=task.is_async,
            cpu_bound=opts.cpu_bound,
            retries=min(MAX_RETRIES, request.retries if request.retries is not None else opts.retries),
            retry_delay=request.retry_delay if request.retry_delay is not None else opts.retry_delay,
            timeout=request.timeout if request.timeout is not None else opts.timeout,
        )

    async def _execute(self, runnable: _Runnable, request: TaskRequest) -> Any:
        items: Sequence[tuple[Sequence[Any], dict[str, Any]]] | None = request.items
        timeout = runnable.timeout
        if runnable.cpu_bound and runnable.target is not None:
            assert self.pool is not None
            return await self.pool.run(
                runnable.target,
                request.args,
                request.call_kwargs,
                items=items,
                retries=runnable.retries,
                timeout=timeout,
            )
        if runnable.is_async:
            coro = (
                self._run_items_async(runnable, items)
                if items is not None
                else runnable.func(*request.args, **request.call_kwargs)
            )
            try:
                return await asyncio.wait_for(coro, timeout) if timeout is not None else await coro
            except TimeoutError:
                raise TaskTimeout(f"ran longer than its timeout of {timeout} s and was cancelled") from None
        loop = asyncio.get_running_loop()
        call = (
            functools.partial(run_items, runnable.func, items, runnable.retries)
            if items is not None
            else functools.partial(runnable.func, *request.args, **request.call_kwargs)
        )
        future = loop.run_in_executor(self._threads, call)
        if timeout is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TaskTimeout(
                f"ran longer than its timeout of {timeout} s; its thread was abandoned "
                "(it finishes in the background and its result is discarded)"
            ) from None

    async def _run_items_async(
        self, runnable: _Runnable, items: Sequence[tuple[Sequence[Any], dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        outcomes: list[dict[str, Any]] = []
        for args, kwargs in items:
            for attempt in range(runnable.retries + 1):
                try:
                    outcomes.append({"ok": await runnable.func(*args, **kwargs)})
                    break
                except Exception as exc:
                    if attempt >= runnable.retries:
                        outcomes.append({"error": error_to_data(exc)})
        return outcomes

    # -- answers -------------------------------------------------------------------------------------

    async def _finish(self, envelope: Envelope, info: TaskInfo) -> None:
        """Store the outcome and publish it to the reply queue (a result that cannot travel becomes a failure)."""
        reply: tuple[str, bytes, dict[str, Any]] | None = None
        if envelope.reply_to:
            try:
                reply = await self._encode_reply(envelope, info)
            except (TypeError, MessageTooLarge) as exc:
                info.status = "failed"
                info.result = None
                info.error = error_to_data(TypeError(f"the result of task {info.name} cannot travel: {exc}"))
                reply = await self._encode_reply(envelope, info)
        else:
            from taskstream.messages import dumps

            try:
                dumps(info.result)
            except TypeError as exc:
                info.status, info.result = "failed", None
                info.error = error_to_data(TypeError(f"the result of task {info.name} cannot travel: {exc}"))
        run_time = info.finished_at - info.started_at if info.finished_at and info.started_at else None
        self.context.metrics.task_finished(info.name, info.status, run_time)
        if reply is None:
            await self.runtime.store.finish(info)
            return
        # The record is written while the reply travels: the store's commit is off the round trip's latency.
        # The request is acked (when this returns) only once both are done, so an outcome is never lost: a
        # client whose reply was dropped reads the record after its reconnect. A client may see the reply
        # before the record; its get_task answers from the reply until then (TaskClient.local_info_by_id).
        # A store that fails raises here after the reply went out: the request is retried, the client keeps
        # the first answer.
        stored = asyncio.get_running_loop().create_task(self._store_after_reply(info))
        try:
            await self._publish_reply(envelope, reply)
        finally:
            await stored

    async def _store_after_reply(self, info: TaskInfo) -> None:
        # One loop turn first: the broker client's writer puts the reply on the socket in the next turn, and a
        # commit of a quiet store runs inline (tens of microseconds) that would otherwise come before it.
        await asyncio.sleep(0)
        await self.runtime.store.finish(info)

    async def _encode_reply(self, envelope: Envelope, info: TaskInfo) -> tuple[str, bytes, dict[str, Any]]:
        reply = Envelope(id=new_task_id(), kind="result", correlation_id=envelope.id, body=reply_body(info))
        data, _ = await self.context.producer.prepare(reply)  # a large result travels by reference
        return reply.id, data, broker_headers(reply)

    async def _publish_reply(self, envelope: Envelope, reply: tuple[str, bytes, dict[str, Any]] | None) -> None:
        if reply is None or not envelope.reply_to:
            return
        message_id, data, headers = reply
        try:
            await self._replies.publish(envelope.reply_to, OutgoingMessage(data, headers, message_id=message_id))
        except Exception as exc:  # the client is gone; the store still has the outcome
            log.warning("could not reply to %s for task %s: %s", envelope.reply_to, envelope.id, exc)

    async def _blocked(self, delivery: Delivery, envelope: Envelope, record: TaskInfo) -> None:
        """Answer a task the store will not let run: replay its outcome to its submitter, refuse anyone else.

        A finished (or cancelled) task's stored outcome goes back only to the reply queue that submitted it
        (a duplicate delivery). A message reusing the id of another submitter's task gets a refusal that
        says nothing about that task, is dead-lettered, and leaves the record alone.
        """
        reply_to = envelope.reply_to or ""
        same = record.reply_to == reply_to or (record.status == "cancelled" and not record.reply_to)
        if same and record.done:
            if envelope.reply_to:
                await self._publish_reply(envelope, await self._encode_reply(envelope, record))
            return
        error = TaskRefused(f"task id {envelope.id} belongs to another submission; refusing to run or answer it")
        await self._answer_refusal(envelope, self._refusal_info(envelope, "", error))
        self._mark_answered(delivery)
        raise Reject(str(error))

    def _refusal_info(self, envelope: Envelope, name: str, error: TaskRefused) -> TaskInfo:
        return TaskInfo(
            envelope.id,
            name=name,
            status="failed",
            submitted_at=envelope.created_at,
            finished_at=time.time(),
            worker=self.worker_id,
            error=error_to_data(error),
            reply_to=envelope.reply_to or "",
        )

    async def _refuse_and_reject(
        self, delivery: Delivery, envelope: Envelope, name: str, error: TaskRefused
    ) -> NoReturn:
        """Refuse the task (see :meth:`refuse`), then have the consumer runtime dead-letter it with the reason."""
        await self.refuse(envelope, name, error)
        self._mark_answered(delivery)
        raise Reject(str(error))

    def _mark_answered(self, delivery: Delivery) -> None:
        if len(self._answered) >= MAX_ANSWERED:  # dead-letter publishes failed many times: forget (a duplicate
            self._answered.clear()  # failed reply is harmless, the client takes the first)
        self._answered.add(_delivery_key(delivery))

    async def _on_dead_letter(self, delivery: Delivery, envelope: Envelope | None, reason: str) -> None:
        """Answer the client of a task the consumer runtime dead-lettered, unless :meth:`handle` did already.

        A message that did not decode (``envelope`` is ``None``: unreadable body, payload gone) is answered
        when its broker headers name a task (``ts_kind``, ``correlation_id``, ``reply_to``), as a task
        client's messages do.
        """
        key = _delivery_key(delivery)
        if key in self._answered:
            self._answered.discard(key)
            return
        if envelope is None:
            envelope = _envelope_from_headers(delivery)
        if envelope is None or envelope.kind != "task":
            return
        body = envelope.body
        name = body.get("task") if isinstance(body, dict) else None
        await self.refuse(envelope, name if isinstance(name, str) else "", TaskRefused(f"dead-lettered: {reason}"))

    async def refuse(self, envelope: Envelope, name: str, error: TaskRefused) -> None:
        """Record a refusal (never over a final or another submitter's record) and answer the client.

        The reply goes out even when the store write fails, so the client's future always learns why.
        """
        info = self._refusal_info(envelope, name, error)
        try:
            await self.runtime.store.record_refusal(info)
        except Exception as exc:
            log.warning("could not record the refusal of task %s in the result store: %s", envelope.id, exc)
            info.error = error_to_data(
                TaskRefused(f"{error} (the refusal could not be recorded in the result store: {type(exc).__name__})")
            )
        await self._answer_refusal(envelope, info)

    async def _answer_refusal(self, envelope: Envelope, info: TaskInfo) -> None:
        if not envelope.reply_to:
            return
        try:
            reply = await self._encode_reply(envelope, info)
        except Exception as exc:
            log.warning("could not encode the refusal of task %s: %s", envelope.id, exc)
            return
        await self._publish_reply(envelope, reply)


def _delivery_key(delivery: Delivery) -> tuple[str, str, int]:
    return (delivery.queue, delivery.message_id, delivery.attempt)


def _envelope_from_headers(delivery: Delivery) -> Envelope | None:
    """What the broker headers of an undecodable task message say: its task id and reply queue."""
    headers = delivery.headers
    if header_str(headers, "ts_kind") != "task":
        return None
    task_id, reply_to = header_str(headers, "correlation_id"), header_str(headers, "reply_to")
    if not task_id or not reply_to:
        return None
    return Envelope(id=task_id, kind="task", reply_to=reply_to)

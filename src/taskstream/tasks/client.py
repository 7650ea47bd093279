"""The submitting side: encode calls, hold dataflow inputs, publish in batches, and listen on a reply queue.

Every client App owns one reply queue (``ts-reply-<random>``, deleted when the App stops). Workers publish
each task's outcome there; the listener resolves the matching future by task id. Nothing polls.

On RabbitMQ the reply queue is transient (see ``brokers/rabbitmq/topology.py``): a broker restart drops it
with the replies in it. After every reconnect the client therefore reads the outcomes of the tasks it still
waits for from the result store, where a worker records each outcome before it acks the request (now, and
twice more a little later, for records committed just after a reply was lost). A worker writes the record
and publishes the reply at the same time, so a reply can arrive before the record is readable: until it is,
``get_task`` answers from the outcome this client received (:meth:`TaskClient.local_info_by_id`).

Submissions made in one turn of the event loop go out as one ``publish_batch`` per queue (5,000 ``submit``
calls in a loop become a handful of broker requests), calls of one task packed into bundles of up to 64 by
what its run time is known to be (:mod:`taskstream.tasks.bundling`), and the ``pending`` records go to the
result store in one write. Replies may come bundled too; each is applied alone. Arguments are encoded by
``submit`` itself, so a value that cannot travel fails there, at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError as PydanticValidationError

from taskstream.brokers.base import Delivery, OutgoingMessage, Subscription
from taskstream.bundles import BROKEN_BUNDLE, bundle_limit, is_bundle, unpack
from taskstream.errors import BrokerConnectionError, ConfigurationError, TaskError
from taskstream.intake import Intake, Refused, reply_dead_letter_queue
from taskstream.messages import Envelope, encode, new_id, short_errors
from taskstream.payloads import PayloadRef
from taskstream.producer import broker_headers
from taskstream.tasks.bundling import Bundler
from taskstream.tasks.dataflow import dependency_error, find_futures, resolve_futures
from taskstream.tasks.errors import error_from_data, error_to_data
from taskstream.tasks.future import FutureOwner, TaskFuture
from taskstream.tasks.protocol import TaskReply, new_task_id, reply_body, sign_request
from taskstream.tasks.registry import Task, chunked
from taskstream.tasks.stores.base import ResultStore, TaskInfo

if TYPE_CHECKING:
    from taskstream.context import AppContext
    from taskstream.tasks.runtime import TaskRuntime

__all__ = ["TaskClient"]

log = logging.getLogger("taskstream.tasks.client")

REPLY_PREFETCH = 1000
REPLY_ACK_DELAY = 0.02  # seconds a handled reply waits to be acked with others (see _listen)
REPLY_ACK_BATCH = REPLY_PREFETCH // 2  # acked at once from this many, so the prefetch window never fills
PENDING_DELAY = 0.05  # seconds pending records wait, to be written in fewer, larger batches
RECOVER_DELAYS = (0.0, 1.0, 5.0)  # after a reconnect: when to read waiting tasks' outcomes from the store
MAX_FINISHED = 10_000  # outcomes remembered after their reply, for get_task before the store has them

Call = tuple[Sequence[Any], dict[str, Any]]


@dataclass(eq=False)
class _Pending:
    """One task message on its way: a single call, or a chunk of ``map`` items."""

    task: Task[Any, Any]
    info: TaskInfo
    futures: list[TaskFuture[Any]]
    chunked: bool
    calls: list[Call] = field(default_factory=list)

    @property
    def task_id(self) -> str:
        return self.info.task_id


class TaskClient(FutureOwner):
    """Submits tasks for one App and receives their results.

    Args:
        runtime: the task runtime it submits for (its loop, result store and signing key).
        context: the App's broker, producer and metrics (the runtime rebinds it when the App starts).
    """

    def __init__(self, runtime: TaskRuntime, context: AppContext) -> None:
        self.runtime = runtime
        self.context = context
        self.reply_queue = f"ts-reply-{new_id()[:24]}"
        self._waiting: dict[str, _Pending] = {}
        self._outbox: dict[str, list[tuple[OutgoingMessage, _Pending]]] = {}
        self._records: list[TaskInfo] = []
        self._flush_scheduled = False
        self._records_scheduled = False
        self._declared: set[str] = set()
        self._ready: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._listener: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._to_ack: list[Delivery] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self._to_release: list[PayloadRef] = []  # payloads of large results, deleted once their reply is acked
        self._finished: OrderedDict[str, TaskInfo] = OrderedDict()  # recent outcomes received (see get_task)
        self._reconnect_hook: Any = None  # (broker, listener) registered for recovery after a reconnect
        self.bundler = Bundler()  # which calls due together travel as one broker message

    # -- FutureOwner ---------------------------------------------------------------------------------

    def in_loop_thread(self) -> bool:
        return self.runtime.in_loop_thread()

    def local_info(self, future: TaskFuture[Any]) -> TaskInfo | None:
        entry = self._waiting.get(future.task_id)
        return entry.info if entry is not None else None

    def local_info_by_id(self, task_id: str) -> TaskInfo | None:
        """A copy of what this client knows about a task it waits for or recently received the outcome of."""
        entry = self._waiting.get(task_id)
        if entry is not None:
            return replace(entry.info)
        finished = self._finished.get(task_id)
        return replace(finished) if finished is not None else None

    def _remember(self, info: TaskInfo) -> None:
        """Keep a received outcome for ``get_task`` until the store surely has it (bounded, oldest dropped)."""
        self._finished[info.task_id] = info
        if len(self._finished) > MAX_FINISHED:
            self._finished.popitem(last=False)

    def future_by_id(self, task_id: str) -> TaskFuture[Any] | None:
        """The (first) future of a task this client is still waiting for."""
        entry = self._waiting.get(task_id)
        return entry.futures[0] if entry is not None else None

    def cancel_future(self, future: TaskFuture[Any]) -> bool:
        entry = self._waiting.get(future.task_id)
        if entry is None:
            return future.cancelled()
        if not self.runtime.store.try_cancel(future.task_id):
            return False
        self._waiting.pop(future.task_id, None)
        entry.info.status = "cancelled"
        entry.info.finished_at = time.time()
        for f in entry.futures:
            f._force_cancel()
        return True

    # -- submitting (any thread) ---------------------------------------------------------------------

    def submit_calls(self, task: Task[Any, Any], calls: Sequence[Call], chunksize: int) -> list[TaskFuture[Any]]:
        """Create the futures, encode what can be sent now, and hand the rest to the loop."""
        entries: list[_Pending] = []
        now = time.time()
        for group in chunked(calls, chunksize) if chunksize > 1 else ([c] for c in calls):
            task_id = new_task_id()
            info = TaskInfo(
                task_id,
                name=task.name,
                queue=task.options.queue,
                status="pending",
                submitted_at=now,
                reply_to=self.reply_queue,
            )
            is_chunk = chunksize > 1
            futures: list[TaskFuture[Any]] = [
                TaskFuture(self, task_id, task.name, index=i if is_chunk else None) for i in range(len(group))
            ]
            entries.append(_Pending(task, info, futures, is_chunk, list(group)))
        ready: list[tuple[_Pending, OutgoingMessage]] = []
        held: list[tuple[_Pending, list[concurrent.futures.Future[Any]]]] = []
        for entry in entries:
            inputs = find_futures(entry.calls)
            if inputs:
                held.append((entry, inputs))
            else:
                ready.append((entry, self._encode(entry, entry.calls)))
        for entry in entries:
            self._waiting[entry.task_id] = entry
        self.runtime.call_soon(self._accept, ready, held)
        self.context.metrics.tasks_submitted(task.name, len(entries))
        return [f for entry in entries for f in entry.futures]

    async def send_without_reply(self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """Publish one call with no reply queue (fire and forget); returns its task id for ``get_task``."""
        info = TaskInfo(new_task_id(), name=task.name, queue=task.options.queue, submitted_at=time.time())
        entry = _Pending(task, info, [], False, [(args, kwargs)])
        message = self._encode(entry, entry.calls, reply=False)
        await self._ensure_queue(task.options.queue)
        await self.runtime.store.add_pending([info])
        await self._publish(task.options.queue, [message])
        self.context.metrics.tasks_submitted(task.name)
        return info.task_id

    def _encode(self, entry: _Pending, calls: Sequence[Call], reply: bool = True) -> OutgoingMessage:
        task = entry.task
        if entry.chunked:
            body = task.request_body((), {}, items=[(list(a), dict(k)) for a, k in calls])
        else:
            args, kwargs = calls[0]
            body = task.request_body(list(args), dict(kwargs))
        reply_to = self.reply_queue if reply else None
        if task.code is not None:  # shipped code: sign this very request (id, reply queue, arguments, expiry)
            key = self.runtime.signing_key()
            if key is None:
                raise ConfigurationError(f"ship_code=True for {task.name!r} needs a signing key on this client")
            body = sign_request(key, entry.task_id, reply_to, body)
        envelope = Envelope(id=entry.task_id, kind="task", reply_to=reply_to, correlation_id=entry.task_id, body=body)
        data = encode(envelope)  # sized (and, when large, offloaded to the payload store) in _publish
        headers = broker_headers(envelope)
        self.context.producer.tracing.created(task.options.queue, headers, entry.futures, entry.calls)
        return OutgoingMessage(data, headers, message_id=entry.task_id)

    # -- on the loop ---------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _accept(
        self,
        ready: list[tuple[_Pending, OutgoingMessage]],
        held: list[tuple[_Pending, list[concurrent.futures.Future[Any]]]],
    ) -> None:
        for entry, message in ready:
            self._enqueue(entry, message)
        for entry, inputs in held:
            self._records.append(entry.info)
            self._hold(entry, inputs)
        self._schedule_flush()

    def _enqueue(self, entry: _Pending, message: OutgoingMessage, record: bool = True) -> None:
        if entry.task_id not in self._waiting:  # cancelled before it was sent
            return
        self._outbox.setdefault(entry.task.options.queue, []).append((message, entry))
        if record:
            self._records.append(entry.info)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._spawn(self._flush())

    async def _flush(self) -> None:
        """Send what was submitted during the last loop turn: one batch per queue."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        self._schedule_records()
        if len(outbox) == 1:
            ((queue, batch),) = outbox.items()
            await self._send(queue, batch)
        elif outbox:
            await asyncio.gather(*(self._send(queue, batch) for queue, batch in outbox.items()))

    def _schedule_records(self) -> None:
        if self._records and not self._records_scheduled:
            # Pending records follow a moment later, off the latency path: a worker that claims the task
            # first wins (the pending write never overwrites), and this client answers get_task meanwhile.
            self._records_scheduled = True
            asyncio.get_running_loop().call_later(PENDING_DELAY, self._flush_records)

    def _flush_records(self) -> None:
        self._records_scheduled = False
        records, self._records = self._records, []
        if records:
            self._spawn(self._record_pending(records))

    async def _record_pending(self, records: list[TaskInfo]) -> None:
        try:
            await self.runtime.store.add_pending(records)
        except Exception as exc:  # the results still come by the reply queue
            log.warning("could not record %d pending task(s) in the result store: %s", len(records), exc)

    async def _send(self, queue: str, batch: list[tuple[OutgoingMessage, _Pending]]) -> None:
        broker = self.context.broker
        size = max(1, broker.capabilities.max_batch)
        max_bytes = bundle_limit(self.context.producer.inline_limit)
        wire = self.bundler.plan([(m, e.task.name, e) for m, e in batch], max_bytes)
        try:
            await self.ensure_started()
            await self._ensure_queue(queue)
            parts = list(chunked(wire, size))
            if len(parts) == 1:  # one broker batch (always for a lone submit): no gather, no task
                results: list[BaseException | None] = [await self._publish_part(queue, parts[0])]
            else:
                results = await asyncio.gather(*(self._publish_part(queue, part) for part in parts))
        except Exception as exc:
            results = [exc]
            parts = [wire]
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, BaseException):
                for _, entries in part:
                    for entry in entries:
                        self._fail(entry, result)

    async def _publish_part(
        self, queue: str, part: Sequence[tuple[OutgoingMessage, list[_Pending]]]
    ) -> BaseException | None:
        """Publish one broker batch; the exception that failed it, or ``None``."""
        try:
            await self._publish(queue, [m for m, _ in part])
        except Exception as exc:
            return exc
        return None

    async def _publish(self, queue: str, messages: list[OutgoingMessage]) -> None:
        """Publish a batch; arguments over the broker's threshold travel by reference (taskstream.payloads)."""
        await self.context.producer.publish_batch(queue, messages)

    async def _ensure_queue(self, queue: str) -> None:
        if queue in self._declared:
            return
        broker = self.context.broker
        dead_letter = broker.dead_letter_name(queue)
        await broker.declare(dead_letter)
        await broker.declare(queue, dead_letter=dead_letter)
        self._declared.add(queue)

    def _fail(self, entry: _Pending, error: BaseException) -> None:
        """Fail a task that never reached a worker: record it, then fail its futures (read-your-writes)."""
        if self._waiting.pop(entry.task_id, None) is None:
            return
        entry.info.status = "failed"
        entry.info.finished_at = time.time()
        entry.info.error = error_to_data(error)
        self._spawn(self._record_failure(entry, error))

    async def _record_failure(self, entry: _Pending, error: BaseException) -> None:
        try:
            await self.runtime.store.finish(entry.info)
        except Exception as exc:
            log.warning("could not record task %s in the result store: %s", entry.task_id, exc)
        for future in entry.futures:
            future._settle(error=error)

    # -- dataflow ------------------------------------------------------------------------------------

    def _hold(self, entry: _Pending, inputs: list[concurrent.futures.Future[Any]]) -> None:
        left = [len(inputs)]
        loop = asyncio.get_running_loop()

        def check() -> None:
            left[0] -= 1
            if left[0] or entry.task_id not in self._waiting:
                return
            error = dependency_error(entry.task.name, inputs)
            if error is not None:
                self._fail(entry, error)
                return
            try:
                calls = [(resolve_futures(list(a)), resolve_futures(dict(k))) for a, k in entry.calls]
                message = self._encode(entry, calls)
            except Exception as exc:  # an input's result cannot travel
                self._fail(entry, exc)
                return
            self._enqueue(entry, message, record=False)

        def one_done(_: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the App stopped
                loop.call_soon_threadsafe(check)

        for future in inputs:
            future.add_done_callback(one_done)

    # -- replies -------------------------------------------------------------------------------------

    async def ensure_started(self) -> None:
        """Declare the reply queue and start listening (once)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(self._start_listener())
        await asyncio.shield(self._ready)

    async def _start_listener(self) -> None:
        broker = self.context.broker
        await broker.declare(self.reply_queue)
        self._subscription = broker.consume(self.reply_queue, prefetch=REPLY_PREFETCH)
        self._listener = asyncio.get_running_loop().create_task(self._listen(self._subscription))
        add = getattr(broker, "add_reconnect_listener", None)
        if add is not None and self._reconnect_hook is None:
            add(self._on_reconnect)
            self._reconnect_hook = broker

    def _on_reconnect(self) -> None:
        if self._waiting:
            self._spawn(self._recover())

    async def _recover(self) -> None:
        """Settle waiting tasks whose outcome the store has (their transient reply may be lost)."""
        store = self.runtime.store
        for delay in RECOVER_DELAYS:
            await asyncio.sleep(delay)
            ids = list(self._waiting)
            if not ids:
                return
            try:
                records = await asyncio.to_thread(_read_records, store, ids)
            except Exception as exc:
                log.warning("could not read %d waiting task(s) from the result store: %s", len(ids), exc)
                continue
            settled = 0
            for record in records:
                if record is None or not record.done or record.reply_to != self.reply_queue:
                    continue  # not finished yet, or submitted by another client
                entry = self._waiting.pop(record.task_id, None)
                if entry is not None:  # else answered by its reply meanwhile
                    self._apply(entry, record.task_id, reply_body(record))
                    settled += 1
            if settled:
                log.info("settled %d task(s) from the result store after a reconnect", settled)

    async def _listen(self, subscription: Subscription) -> None:
        broker = self.context.broker
        intake = Intake(
            broker,
            self.reply_queue,
            claim_check=self.context.producer.claim_check,
            dead_letter_queue=reply_dead_letter_queue(broker),
        )
        try:
            async for delivery in subscription:
                opened = await intake.decode(delivery)
                if isinstance(opened, Refused):  # dead-lettered with the reason (or retried: store down)
                    await intake.refuse(delivery, opened)
                    continue
                if opened.ref is not None:  # a large result, by reference: its payload goes after the ack
                    self._to_release.append(opened.ref)
                assert opened.envelope is not None
                if is_bundle(opened.envelope):  # replies due together: each applied (or refused) alone
                    parts = unpack(delivery, opened.envelope)
                    if not parts:
                        await intake.dead_letter(delivery, BROKEN_BUNDLE)
                        continue
                    for part in parts:
                        if part.envelope is None:
                            await intake.dead_letter(part.delivery, part.refused)
                        else:
                            self._apply_reply(part.envelope)
                            self._to_ack.append(part.delivery)
                else:
                    self._apply_reply(opened.envelope)
                    self._to_ack.append(delivery)
                if len(self._to_ack) >= REPLY_ACK_BATCH:
                    self._ack_replies()
                elif self._ack_timer is None:
                    # Acks of handled replies wait a moment and go out together, off the latency path: a lone
                    # round trip would otherwise send an ack frame (and wake the broker) just as the caller
                    # submits its next task. The future is settled already; a reply redelivered because its ack
                    # was late or lost finds no waiting entry and is ignored.
                    self._ack_timer = asyncio.get_running_loop().call_later(REPLY_ACK_DELAY, self._ack_replies)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("reply listener on %s stopped: %s", self.reply_queue, exc)
            self._fail_all(BrokerConnectionError(f"the reply listener stopped: {exc}"))

    def _ack_replies(self) -> None:
        """Ack every reply handled since the last call together (brokers merge same-turn acks)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        deliveries, self._to_ack = self._to_ack, []
        refs, self._to_release = self._to_release, []
        self._spawn(self._ack_all(deliveries, refs))

    async def _ack_all(self, deliveries: list[Delivery], refs: list[PayloadRef]) -> None:
        results = await asyncio.gather(*(d.ack() for d in deliveries), return_exceptions=True)
        for ref in refs:  # the results were read: their payloads go
            await self.context.producer.claim_check.release(ref)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:  # the broker redelivers them; the futures are already resolved, duplicates are ignored
            log.warning("could not ack %d reply(ies) on %s: %s", len(errors), self.reply_queue, errors[0])

    def _apply_reply(self, envelope: Envelope) -> None:
        try:
            self._on_reply(envelope)
        except Exception as exc:  # a bug here must not stop the listener for every other task
            log.exception("could not apply a reply on %s: %s", self.reply_queue, exc)

    def _on_reply(self, envelope: Envelope) -> None:
        """Settle the futures of the task a reply names; a reply with broken fields fails them, saying why."""
        body = envelope.body
        task_id = envelope.correlation_id or (str(body.get("task_id") or "") if isinstance(body, dict) else "")
        entry = self._waiting.pop(task_id, None)
        if entry is None:
            return  # cancelled here, or a duplicate
        self._apply(entry, task_id, body)

    def _apply(self, entry: _Pending, task_id: str, body: Any) -> None:
        """Settle ``entry``'s futures from a reply body (from the reply queue, or rebuilt from the store)."""
        try:
            reply = TaskReply.model_validate(body)
        except PydanticValidationError as exc:
            problems = short_errors(exc, "<body>")
            self._settle_all(entry, TaskError(f"malformed reply for task {entry.task.name} ({task_id}): {problems}"))
            return
        info = entry.info
        info.status = reply.status
        info.started_at = reply.started_at
        info.finished_at = reply.finished_at
        info.worker = reply.worker
        info.attempts = reply.attempts
        self._remember(info)
        self.bundler.learn(entry.task.name, reply.started_at, reply.finished_at)
        if reply.status == "cancelled":
            for future in entry.futures:
                future._force_cancel()
            return
        if reply.status == "failed":
            info.error = reply.error
            error = error_from_data(reply.error, task=entry.task.name)
            for future in entry.futures:
                future._settle(error=error)
            return
        if not entry.chunked:
            info.result = reply.result  # the remembered info sees it too
            entry.futures[0]._settle(reply.result)
            return
        self._settle_chunk(entry, task_id, reply.result)

    def _settle_chunk(self, entry: _Pending, task_id: str, result: Any) -> None:
        outcomes = result if isinstance(result, list) else []
        for i, future in enumerate(entry.futures):
            outcome = outcomes[i] if i < len(outcomes) else None
            if isinstance(outcome, dict) and "error" in outcome:
                future._settle(error=error_from_data(outcome["error"], task=entry.task.name))
            elif isinstance(outcome, dict) and "ok" in outcome:
                future._settle(outcome["ok"])
            else:
                future._settle(
                    error=TaskError(f"malformed reply for task {entry.task.name} ({task_id}): no outcome for item {i}")
                )

    def _settle_all(self, entry: _Pending, error: TaskError) -> None:
        entry.info.status = "failed"
        entry.info.error = error_to_data(error)
        for future in entry.futures:
            future._settle(error=error)

    def _fail_all(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for entry in waiting.values():
            for future in entry.futures:
                future._settle(error=error)

    async def stop(self) -> None:
        """Stop listening, fail futures still waiting, delete the reply queue."""
        if self._reconnect_hook is not None:
            self._reconnect_hook.remove_reconnect_listener(self._on_reconnect)
            self._reconnect_hook = None
        self._flush_records()
        if self._to_ack:
            self._ack_replies()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._subscription is not None:
            await self._subscription.close()
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        self._fail_all(
            BrokerConnectionError("the App stopped before the task finished; ask app.get_task(task_id) later")
        )
        if self._ready is not None:
            with contextlib.suppress(Exception):
                await self.context.broker.delete_queue(self.reply_queue)
        self._ready = None
        self._listener = None
        self._subscription = None
        self._declared.clear()


def _read_records(store: ResultStore, task_ids: list[str]) -> list[TaskInfo | None]:
    """The store's records of ``task_ids`` (on a thread: a SQLite read may wait for a commit)."""
    return [store.get(task_id) for task_id in task_ids]

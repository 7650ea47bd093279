"""Any taskstream queue as a source (on the pipeline's broker or another one).

Deliveries are acked only after the items they carried went through the stage and its outputs were
published (the runtime calls the batch's ``ack``). Taskstream envelopes yield their body; plain JSON from
a foreign producer yields the JSON value. A control envelope ``Stop`` (or a raw ``{"control": "stop"}``) ends
the source; messages behind it stay in the queue. Bytes that do not decode go to the broker's dead-letter queue
of the queue (``<queue>.dlq``; ``<queue>-poison`` on Azure) with the reason and the source keeps going.

Payload references (claim-check, :mod:`taskstream.payloads`) are resolved before the items are emitted, and the
blob is deleted once the delivery is acked; a missing or corrupt payload is dead-lettered with the reason (the
dead letter keeps the reference), a store that cannot be reached requeues the message with a growing pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, get_args

from taskstream.brokers.base import Broker, Delivery, Subscription
from taskstream.errors import ConfigurationError, MalformedMessage, MessageError
from taskstream.intake import Intake, IntakeStats, Refused
from taskstream.messages import Kind, is_envelope_document
from taskstream.payloads.claimcheck import PayloadRef
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch, is_stop
from taskstream.stream_ops.wire import read_record

__all__ = ["QueueSource"]

log = logging.getLogger("taskstream.stream_ops.sources")

#: the envelope kinds a queue source reads (others are dead-lettered)
KINDS = frozenset(get_args(Kind))


class QueueSource(Source):
    """Consume ``queue``.

    Args:
        queue: the queue name (a name ending in ``.fifo`` is declared FIFO).
        broker: a broker URL or instance; default: the pipeline's broker.
        prefetch: most unacked deliveries held.
        with_key: emit ``(key, body)`` for messages that carry a key.
        linger: seconds to wait for more messages to fill a batch once one arrived.
    """

    label = "queue"
    handles_idle = True

    def __init__(
        self,
        queue: str,
        *,
        broker: str | Broker | None = None,
        prefetch: int = 256,
        with_key: bool = False,
        linger: float = 0.005,
        **bounds: Any,
    ) -> None:
        super().__init__(**bounds)
        if not queue:
            raise ConfigurationError("QueueSource needs a queue name")
        self.queue = queue
        self.broker = broker
        self.prefetch = prefetch
        self.with_key = with_key
        self.linger = linger
        self.stats = IntakeStats()

    @property
    def dead_lettered(self) -> int:
        """Messages this source dead-lettered (unreadable, or broken envelopes)."""
        return self.stats.dead_lettered

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        broker, own = await ctx.queue_broker(self.broker, f"QueueSource({self.queue!r})")
        await broker.declare(self.queue, fifo=self.queue.endswith(".fifo"))
        check = ctx.payloads()
        intake = Intake(broker, self.queue, claim_check=check, stats=self.stats)
        subscription = broker.consume(self.queue, prefetch=max(self.prefetch, batch_size))
        emitted = 0
        acked: list[asyncio.Event] = []
        try:
            while True:
                room = self.room(emitted, batch_size)
                if room == 0:
                    break
                deliveries = await self._receive(subscription, room)
                if not deliveries:  # idle for idle_timeout
                    log.info("queue source %r idle for %s s: ending", self.queue, self.idle_timeout)
                    break
                items: list[Any] = []
                ids: list[str | None] = []
                settle: list[Delivery] = []
                refs: list[PayloadRef] = []
                stop = False
                for delivery in deliveries:
                    if stop:
                        await delivery.nack(requeue=True)  # behind a Stop: leave it for the next consumer
                        continue
                    opened = await intake.read(delivery)
                    if isinstance(opened, Refused):
                        await intake.refuse(delivery, opened)  # dead-lettered (or requeued: store down)
                        continue
                    settle.append(delivery)
                    if opened.ref is not None:
                        refs.append(opened.ref)
                    try:
                        value, control = self._interpret(opened.doc)
                    except MessageError as exc:
                        settle.pop()
                        await intake.dead_letter(delivery, str(exc))
                        continue
                    if control is not None:
                        stop = stop or control == "stop"
                        continue
                    items.append(value)
                    ids.append(_item_id(opened.doc, delivery.message_id))

                done = asyncio.Event()
                acked.append(done)

                async def ack(
                    batch: list[Delivery] = settle, refs: list[PayloadRef] = refs, done: asyncio.Event = done
                ) -> None:
                    for d in batch:
                        await d.ack()
                    for ref in refs:  # acked for good: the payloads can go
                        await check.release(ref)
                    done.set()

                emitted += len(items)
                yield SourceBatch(items, ack, ids=ids)
                acked[:] = [e for e in acked if not e.is_set()]
                if stop:
                    break
            # Ending normally: wait until the runtime acked what it took, before closing the subscription
            # (closing returns unacked deliveries to the queue).
            for event in acked:
                await event.wait()
        finally:
            await subscription.close()
            if own:
                await broker.close()

    async def _receive(self, subscription: Subscription, room: int) -> list[Delivery]:
        if self.idle_timeout is None:
            got = [await subscription.__anext__()]
        else:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    got = [await subscription.__anext__()]
            except TimeoutError:
                return []
        deadline = time.monotonic() + self.linger
        while len(got) < room:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    got.append(await subscription.__anext__())
            except TimeoutError:
                break
            except StopAsyncIteration:
                break
        return got

    def _interpret(self, doc: Any) -> tuple[Any, str | None]:
        """The item a decoded message carries, or the control word it is (``stop``).

        Raises:
            MessageError: an envelope whose fields have the wrong types.
        """
        if is_envelope_document(doc):
            record = read_record(doc, None)
            if record.kind not in KINDS:
                raise MalformedMessage(f"malformed message: unknown envelope kind {record.kind!r:.60}")
            if record.kind == "control":
                control = record.body.get("control") if isinstance(record.body, dict) else None
                return None, str(control or "unknown")
            if self.with_key and record.key is not None:
                return (record.key, record.body), None
            return record.body, None
        if is_stop(doc):
            return None, "stop"
        return doc, None


def _item_id(doc: Any, message_id: str | None) -> str | None:
    """The id an item read from a queue keeps downstream: its envelope's id, else the broker's message id."""
    if is_envelope_document(doc) and isinstance(doc.get("id"), str):
        return str(doc["id"])
    return message_id or None

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
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from taskstream.brokers.base import Broker, Delivery, Subscription, broker_from_url
from taskstream.errors import ConfigurationError, MessageError
from taskstream.messages import WIRE_VERSION, loads
from taskstream.payloads.base import PayloadStoreError
from taskstream.payloads.claimcheck import PayloadRef, is_reference, open_failure_reason
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch, is_stop
from taskstream.stream_ops.wire import open_record, retry_later

__all__ = ["QueueSource"]

log = logging.getLogger("taskstream.stream_ops.sources")


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
        self.dead_lettered = 0

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        own = False
        if isinstance(self.broker, Broker):
            broker = self.broker
        elif isinstance(self.broker, str):
            broker = broker_from_url(self.broker)
            await broker.connect()
            own = True
        elif ctx.broker is not None:
            broker = ctx.broker
        else:
            raise ConfigurationError(f"QueueSource({self.queue!r}) has no broker: pass broker= or run on one")
        await broker.declare(self.queue, fifo=self.queue.endswith(".fifo"))
        check = ctx.payloads()
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
                settle: list[Delivery] = []
                refs: list[PayloadRef] = []
                stop = False
                for delivery in deliveries:
                    if stop:
                        await delivery.nack(requeue=True)  # behind a Stop: leave it for the next consumer
                        continue
                    ref: PayloadRef | None = None
                    try:
                        if is_reference(delivery.body):
                            doc, ref = await open_record(check, delivery.body, delivery.message_id)
                        else:
                            doc = loads(delivery.body)
                    except MessageError as exc:
                        settle.append(delivery)
                        await self._dead_letter(broker, delivery, open_failure_reason(exc))
                        continue
                    except PayloadStoreError as exc:
                        reason = await retry_later(delivery, str(exc))
                        if reason is not None:
                            settle.append(delivery)
                            await self._dead_letter(broker, delivery, reason)
                        continue
                    settle.append(delivery)
                    if ref is not None:
                        refs.append(ref)
                    value, control = self._interpret(doc)
                    if control is not None:
                        stop = stop or control == "stop"
                        continue
                    items.append(value)

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
                yield SourceBatch(items, ack)
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
        """The item a decoded message carries, or the control word it is (``stop``)."""
        if isinstance(doc, dict) and doc.get("ts") == WIRE_VERSION and "kind" in doc:
            body = doc.get("body")
            if doc["kind"] == "control":
                control = body.get("control") if isinstance(body, dict) else None
                return None, str(control or "unknown")
            key = doc.get("key")
            if self.with_key and key is not None:
                return (str(key), body), None
            return body, None
        if is_stop(doc):
            return None, "stop"
        return doc, None

    async def _dead_letter(self, broker: Broker, delivery: Delivery, reason: str) -> None:
        self.dead_lettered += 1
        dlq = broker.dead_letter_name(self.queue)
        log.warning("dead-lettering message %s from %r: %s", delivery.message_id, self.queue, reason)
        headers = dict(delivery.headers)
        headers.update(
            {"x-death-reason": reason[:4000], "x-original-queue": self.queue, "x-attempts": delivery.attempt}
        )
        with contextlib.suppress(Exception):
            await broker.declare(dlq)
        await broker.publish(dlq, delivery.body, headers=headers, message_id=delivery.message_id)

"""Reading an SQS queue: long-poll receives over the shared polling base, settles by receipt handle."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from taskstream.brokers.polling import Backoff, PolledDelivery, PollingSubscription
from taskstream.brokers.sqs.client import SQSError, ignore_outcome, is_gone
from taskstream.brokers.sqs.codec import QueueInfo, decode_message
from taskstream.brokers.sqs.config import SHORT_POLL_PAUSE, SQS_MAX_BATCH, visibility
from taskstream.errors import BrokerError, ConfigurationError, QueueNotFound

if TYPE_CHECKING:
    from taskstream.brokers.sqs.broker import SQSBroker

__all__ = ["SQSDelivery", "SQSSubscription"]

log = logging.getLogger("taskstream.brokers.sqs")


class SQSDelivery(PolledDelivery):
    """A received SQS message: its SQS id, the newest receipt handle, and whether a delete is under way."""

    __slots__ = ("_subscription", "deleting", "receipt", "sqs_id")

    def __init__(
        self,
        subscription: SQSSubscription,
        *,
        sqs_id: str,
        receipt: str,
        deadline: float,
        queue: str,
        body: bytes,
        headers: dict[str, Any],
        message_id: str,
        attempt: int,
        key: str | None,
    ) -> None:
        super().__init__(
            deadline=deadline, queue=queue, body=body, headers=headers, message_id=message_id, attempt=attempt, key=key
        )
        self._subscription = subscription
        self.sqs_id = sqs_id
        self.receipt = receipt
        self.deleting = False  # an ack (delete) is under way

    async def _ack(self) -> None:
        await self._subscription._settle(self, None)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        await self._subscription._settle(self, visibility(delay or 0) if requeue else None)

    async def _extend(self, seconds: float) -> None:
        await self._subscription._change(self, visibility(seconds))


class SQSSubscription(PollingSubscription[SQSDelivery]):
    """``ceil(prefetch / 10)`` long polls (at most ``max_receives``) keep up to ``prefetch`` messages received.

    Attributes:
        duplicates: copies of a held message the server handed out again (moto does under load).
    """

    log: ClassVar[logging.Logger] = log
    max_batch: ClassVar[int] = SQS_MAX_BATCH

    def __init__(self, broker: SQSBroker, queue: str, prefetch: int, info: QueueInfo | None = None) -> None:
        options = broker.options
        super().__init__(
            queue,
            prefetch,
            visibility_timeout=options.visibility_timeout,
            pollers=min(options.max_receives, math.ceil(max(prefetch, 1) / SQS_MAX_BATCH)),
            low_water=min(SQS_MAX_BATCH, prefetch) // 2,  # fuller receives: fewer calls for the same messages
            backoff=Backoff(0.2, 5.0),
        )
        self._broker = broker
        self._info = info
        self._by_id: dict[str, SQSDelivery] = {}
        self.duplicates = 0

    # -- receiving ------------------------------------------------------------------------------------

    async def _prepare(self) -> None:
        self._info = self._info or await self._broker._lookup(self.queue)

    async def _receive(self, count: int) -> Sequence[SQSDelivery]:
        info = self._info
        assert info is not None  # _prepare looked it up
        options = self._broker.options
        started = time.monotonic()
        response = await self._broker._call(
            "receive_message",
            f"receive from {self.queue!r}",
            QueueUrl=info.url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=options.wait_time,
            VisibilityTimeout=visibility(options.visibility_timeout),
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
        )
        # The server handed the messages out between ``started`` and now: a long poll may have waited
        # seconds for them, while the answer itself takes milliseconds. Assume at most half a second.
        deadline = max(started, time.monotonic() - 0.5) + options.visibility_timeout
        return [self._delivery(info, raw, deadline) for raw in response.get("Messages", ())]

    def _classify(self, exc: Exception) -> BaseException | None:
        if isinstance(exc, QueueNotFound | ConfigurationError) or not isinstance(exc, BrokerError):
            return exc
        return None  # throttled, a network blip, a 5xx: keep going, slower

    def _is_gone(self, exc: BaseException) -> bool:
        return is_gone(exc)

    async def _after_receive(self, count: int) -> None:
        if not count and self._broker.options.wait_time == 0:
            await asyncio.sleep(SHORT_POLL_PAUSE)  # short polling: do not spin on an empty queue

    def _delivery(self, info: QueueInfo, raw: Any, deadline: float) -> SQSDelivery:
        sqs_id = str(raw["MessageId"])
        try:
            body, headers, message_id, key = decode_message(info, raw)
        except Exception as exc:  # a body we cannot even unwrap: hand it over raw, the runtime dead-letters it
            log.warning("SQS message %s on %r has an unreadable envelope: %s", sqs_id, self.queue, exc)
            body, headers, message_id, key = str(raw.get("Body", "")).encode(), {}, sqs_id, None
        return SQSDelivery(
            self,
            sqs_id=sqs_id,
            receipt=str(raw["ReceiptHandle"]),
            deadline=deadline,
            queue=self.queue,
            body=body,
            headers=headers,
            message_id=message_id,
            attempt=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
            key=key,
        )

    def _admit(self, delivery: SQSDelivery) -> bool:
        held = self._by_id.get(delivery.sqs_id)
        if held is not None and held.deleting:
            # A copy of a message whose delete is under way (moto's concurrent receives): drop it, and delete
            # this copy's receipt too in case the server only honours the newest one.
            self.duplicates += 1
            assert self._info is not None
            future = self._broker._batcher(self._info, "delete").submit({"ReceiptHandle": delivery.receipt})
            future.add_done_callback(ignore_outcome)
            return False
        if held is not None and not held.settled and held.deadline > time.monotonic():
            # A second copy while ours is still hidden: impossible on SQS, seen on moto with concurrent
            # receives. Keep one delivery; the newest receipt handle is the one that settles the message.
            self.duplicates += 1
            held.receipt = delivery.receipt
            held.deadline = max(held.deadline, delivery.deadline)
            return False
        self._by_id[delivery.sqs_id] = delivery
        return True

    # -- settling -------------------------------------------------------------------------------------

    def _release(self, delivery: SQSDelivery) -> None:
        super()._release(delivery)
        if not delivery.deleting and self._by_id.get(delivery.sqs_id) is delivery:
            del self._by_id[delivery.sqs_id]

    async def _settle(self, delivery: SQSDelivery, seconds: int | None) -> None:
        info = self._info
        assert info is not None  # a delivery exists only after the queue was looked up
        # Settled from now on (as on every backend): its prefetch slot is free while the call is under way.
        if seconds is not None:
            self._release(delivery)
            await self._change(delivery, seconds)
            return
        delivery.deleting = True  # until the delete is done, copies of this message are duplicates
        self._release(delivery)
        try:
            await self._broker._batcher(info, "delete").submit({"ReceiptHandle": delivery.receipt})
        except SQSError as exc:
            if exc.code != "ReceiptHandleIsInvalid":
                raise
            # Already deleted (a duplicate's ack), or received again elsewhere, which then owns it: AWS itself
            # answers such deletes with success.
            log.info("ack of message %s on %r: %s", delivery.sqs_id, self.queue, exc)
        finally:
            delivery.deleting = False
            if self._by_id.get(delivery.sqs_id) is delivery:
                del self._by_id[delivery.sqs_id]

    async def _change(self, delivery: SQSDelivery, seconds: int) -> None:
        info = self._info
        assert info is not None
        started = time.monotonic()
        await self._broker._batcher(info, "visibility").submit(
            {"ReceiptHandle": delivery.receipt, "VisibilityTimeout": seconds}
        )
        delivery.deadline = started + seconds

    async def _set_visibility(self, delivery: SQSDelivery, seconds: float) -> None:
        await self._change(delivery, visibility(seconds))

    # -- closing --------------------------------------------------------------------------------------

    async def _stop_pollers(self) -> None:
        # A receive in flight is not cancelled (the server may be answering it, and cancelling would strand
        # its messages until their visibility timeout): it ends by itself and gives back what it got at once.
        # The broker's close() waits for such receives, then cancels what is left.
        for task in self._tasks:
            if not task.done():
                self._broker._stragglers.add(task)
                task.add_done_callback(self._broker._stragglers.discard)

    async def _give_back(self, deliveries: Sequence[SQSDelivery]) -> None:
        if deliveries and self._info is not None:
            # Extensions of buffered messages still under way must not land after the returns.
            await self._broker._batcher(self._info, "visibility").drain()
        await super()._give_back(deliveries)

    async def close(self) -> None:
        await super().close()
        self._by_id.clear()
        self._broker._subscriptions.discard(self)

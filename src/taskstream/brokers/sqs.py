"""AWS SQS backend on aiobotocore: long polling, batched sends and settles, FIFO groups, native redrive.

URL: ``sqs://[region]/?endpoint_url=...&queue_prefix=...&visibility_timeout=30`` (no region: the AWS
environment's). Credentials come from the usual AWS chain (environment, ``profile=``, config files, instance
role); they are never part of the URL and never logged. Query parameters (all optional):

======================  =========  ===========================================================================
Parameter               Default    Meaning
======================  =========  ===========================================================================
``endpoint_url``        AWS        another SQS API server (moto, LocalStack)
``profile``             none       AWS profile name from the config files
``queue_prefix``        ``""``     prepended to every queue name (environments sharing one account)
``visibility_timeout``  ``30``     seconds a received message stays hidden (sent with every receive, so
                                   ``Capabilities.visibility_timeout`` holds on queues made elsewhere too)
``wait_time``           ``20``     long-poll seconds per receive (0-20; 0 polls every 0.1 s when empty)
``max_receives``        ``10``     most receives in flight per subscription (prefetch / 10, rounded up, below);
                                   a receive starts when at least half a batch of prefetch slots is free
``max_receive_count``   settings   RedrivePolicy ``maxReceiveCount`` of created queues: deliveries before SQS
                                   itself moves a message to the dead-letter queue. Default
                                   ``TASKSTREAM_MAX_ATTEMPTS`` (5), the runtime's ``max_attempts``
``max_message_bytes``   1048576    ``MaximumMessageSize`` of created queues (the SQS maximum, 1 MiB)
``create_queues``       ``true``   ``declare`` creates missing queues; ``false``: look up only
``max_connections``     ``50``     HTTP connection pool size
``close_grace``         wait + 2   seconds the broker's ``close()`` lets receives in flight finish before
                                   cancelling them (by default long enough for a long poll to end and give
                                   back what it received, so a clean stop hides nothing)
======================  =========  ===========================================================================

How the broker contract maps onto SQS:

=================  ==========================================================================================
Operation          SQS API
=================  ==========================================================================================
receive            ``ReceiveMessage`` long poll (``wait_time``, up to 10 per call, ``VisibilityTimeout`` sent);
                   ``ceil(prefetch / 10)`` receives in flight (at most ``max_receives``), never more messages
                   held than ``prefetch``
ack                ``DeleteMessageBatch`` by receipt handle; acks that arrive together share a call
nack(requeue)      ``ChangeMessageVisibilityBatch`` to 0, or to ``delay`` seconds (rounded up, max 12 h)
nack(no requeue)   delete (the runtime has dead-lettered the message first)
extend             ``ChangeMessageVisibility(Batch)`` to ``seconds`` from now (the runtime's heartbeat);
                   messages received ahead and not yet handed out are extended by the subscription itself
attempt            ``ApproximateReceiveCount``
visibility         unacked messages return after ``visibility_timeout``; ``close()`` returns held ones at once
publish            ``SendMessageBatch``: concurrent publishes share calls; ``publish_batch`` sends 10 per call.
                   FIFO queues: one call at a time, in the order publishes were made (pipelined
                   ``publish_batch`` calls too), so per-group order holds through ``Producer.send_many``
delay              ``DelaySeconds`` (at most 900 s; FIFO queues have no per-message delay)
FIFO               queue names ending in ``.fifo``; ``MessageGroupId`` = the message key (``default``
                   without one); ``MessageDeduplicationId`` = the message id (5-minute window)
headers            one ``taskstream`` JSON message attribute (SQS allows only 10 attributes); plain attributes
                   of other producers are read too (String/Number as values, Binary as base64 text)
body               UTF-8 text as is; other bytes base64 (flagged in the attribute), which counts 4/3 toward the
                   size limit
size limit         the queue's ``MaximumMessageSize``, counting body and attributes; over it
                   ``MessageTooLarge``. ``Capabilities.max_message_bytes`` keeps 8 KiB of that for headers
                   (including a dead-letter reason)
dead-letter        two paths: (1) the runtime dead-letters failures (after ``max_attempts``), rejections and
                   malformed bodies itself, publishing to ``<queue>-dlq`` (``dead_letter_name``) with
                   ``x-death-reason`` headers;
                   (2) SQS's ``RedrivePolicy`` (set by ``declare(queue, dead_letter=...)``) moves a message
                   that was *received* more than ``max_receive_count`` times without being settled, i.e.
                   consumers that crash or hang on it; such messages carry no reason
queues             names: ``.`` becomes ``-`` (``orders.dlq`` is ``orders-dlq`` in SQS), ``queue_prefix``
                   in front; URLs and limits are cached; ``declare`` creates missing queues, looks them up
                   otherwise and adds the RedrivePolicy to an existing queue that has none
topics             not supported (``Capabilities.fanout`` is False)
=================  ==========================================================================================

Closing: a subscription's ``close()`` returns what it holds at once and does not cancel a receive in flight;
that receive ends by itself and gives its messages back. The broker's ``close()`` waits for receives still
in flight up to ``close_grace`` (by default ``wait_time + 2`` s: SQS cannot cancel a long poll on the server,
and an abandoned one would hand the next messages to nobody until their visibility timeout), then cancels.
A smaller ``close_grace`` stops faster at the price of such hidden (not lost) messages.

Outages: when receives start failing, one WARNING per subscription says so and the loops retry with back-off;
one INFO line says when they work again.

Duplicates: a second copy of a message this subscription still holds, or is deleting, is dropped (the newest
receipt handle is kept). SQS does not hand out such copies; moto does under concurrent receives. Copies across
consumers are ordinary at-least-once redeliveries and are not hidden.

Purging: SQS allows one ``PurgeQueue`` per 60 s; a second ``purge`` within that window drains the queue by
receive and delete instead.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import difflib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from taskstream.brokers.base import Broker, Capabilities, Delivery, OutgoingMessage, Subscription
from taskstream.errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MessageTooLarge,
    NotSupported,
    PublishError,
    QueueNotFound,
)
from taskstream.messages import new_id
from taskstream.settings import redact_url

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DEFAULT_WAIT_TIME",
    "HEADER_ALLOWANCE",
    "SQSBroker",
    "SQSOptions",
]

log = logging.getLogger("taskstream.brokers.sqs")

DEFAULT_VISIBILITY_TIMEOUT = 30.0
DEFAULT_WAIT_TIME = 20
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
HEADER_ALLOWANCE = 8 * 1024
SQS_MIN_MESSAGE_BYTES = 1024
SQS_MAX_BATCH = 10
SQS_MAX_DELAY = 900
SQS_MAX_VISIBILITY = 12 * 3600
DEFAULT_GROUP = "default"
SHORT_POLL_PAUSE = 0.1
ATTRIBUTE = "taskstream"

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SQS_ID = re.compile(r"^[!-~]{1,128}$")  # group and deduplication ids: printable ASCII, no spaces
# Characters an SQS body may hold (XML 1.0 minus CR, which some paths normalise); anything else goes base64.
_NOT_SQS_TEXT = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NOT_FOUND = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
_AUTH_FAILED = {"InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException", "ExpiredToken"}
_GONE = {"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"}


@dataclass(frozen=True, slots=True)
class SQSOptions:
    """Settings of one :class:`SQSBroker` (see the module docstring for each)."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    queue_prefix: str = ""
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    wait_time: int = DEFAULT_WAIT_TIME
    max_receives: int = 10
    max_receive_count: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    create_queues: bool = True
    max_connections: int = 50
    close_grace: float | None = None  # None: wait_time + 2

    def __post_init__(self) -> None:
        if not 0 < self.visibility_timeout <= SQS_MAX_VISIBILITY:
            raise ConfigurationError(
                f"visibility_timeout must be between 1 and {SQS_MAX_VISIBILITY} s, got {self.visibility_timeout}"
            )
        if not 0 <= self.wait_time <= 20:
            raise ConfigurationError(f"wait_time must be between 0 and 20 s (SQS long polling), got {self.wait_time}")
        if not SQS_MIN_MESSAGE_BYTES + HEADER_ALLOWANCE <= self.max_message_bytes <= DEFAULT_MAX_MESSAGE_BYTES:
            raise ConfigurationError(
                f"max_message_bytes must be between {SQS_MIN_MESSAGE_BYTES + HEADER_ALLOWANCE} and "
                f"{DEFAULT_MAX_MESSAGE_BYTES} (SQS MaximumMessageSize), got {self.max_message_bytes}"
            )
        if self.max_receive_count is not None and not 1 <= self.max_receive_count <= 1000:
            raise ConfigurationError(f"max_receive_count must be between 1 and 1000, got {self.max_receive_count}")
        if self.max_receives < 1 or self.max_connections < 1:
            raise ConfigurationError("max_receives and max_connections must be at least 1")
        if self.close_grace is not None and self.close_grace < 0:
            raise ConfigurationError(f"close_grace must not be negative, got {self.close_grace}")
        if self.queue_prefix and not _QUEUE_NAME.match(self.queue_prefix):
            raise ConfigurationError(
                f"queue_prefix {self.queue_prefix!r} may hold only letters, digits, '-' and '_' (SQS queue names)"
            )


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "endpoint_url": str,
    "profile": str,
    "queue_prefix": str,
    "visibility_timeout": float,
    "wait_time": int,
    "max_receives": int,
    "max_receive_count": int,
    "max_message_bytes": int,
    "create_queues": lambda v: _BOOL[v.lower()],
    "max_connections": int,
    "close_grace": float,
}


@dataclass(slots=True)
class _QueueInfo:
    name: str  # the taskstream name
    sqs_name: str
    url: str
    fifo: bool
    max_bytes: int
    arn: str
    redrive: str | None


class _SQSDelivery(Delivery):
    __slots__ = ("_subscription", "deadline", "deleting", "receipt", "sqs_id")

    def __init__(
        self,
        subscription: _SQSSubscription,
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
        super().__init__(queue=queue, body=body, headers=headers, message_id=message_id, attempt=attempt, key=key)
        self._subscription = subscription
        self.sqs_id = sqs_id
        self.receipt = receipt
        self.deadline = deadline  # monotonic time the message turns visible again (our conservative estimate)
        self.deleting = False  # an ack (delete) is under way

    async def _ack(self) -> None:
        await self._subscription._settle(self, None)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        await self._subscription._settle(self, _visibility(delay or 0) if requeue else None)

    async def _extend(self, seconds: float) -> None:
        await self._subscription._extend(self, seconds)


def _visibility(seconds: float) -> int:
    """Seconds as SQS takes them: whole, rounded up (never earlier than asked), at most 12 h."""
    return max(0, min(SQS_MAX_VISIBILITY, math.ceil(seconds)))


@dataclass(slots=True)
class _Entry:
    request: dict[str, Any]
    size: int
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Batcher:
    """Coalesces single requests to one queue into batch calls of up to 10 entries.

    Adaptive: an entry is sent at once when fewer than ``max_in_flight`` calls are running; otherwise it waits
    and rides with the next call. Light load keeps its latency, heavy load gets full batches.
    """

    send: Callable[[list[_Entry]], Awaitable[None]]
    max_bytes: int = 0  # total size of one call's entries (0: no limit)
    max_in_flight: int = 4
    pending: collections.deque[_Entry] = field(default_factory=collections.deque)
    in_flight: int = 0
    scheduled: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def submit(self, request: dict[str, Any], size: int = 0) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(_Entry(request, size, future))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)  # gather what arrives in this loop turn
        return future

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending and self.in_flight < self.max_in_flight:
            batch = [self.pending.popleft()]
            total = batch[0].size
            while self.pending and len(batch) < SQS_MAX_BATCH:
                nxt = self.pending[0]
                if self.max_bytes and total + nxt.size > self.max_bytes:
                    break
                batch.append(self.pending.popleft())
                total += nxt.size
            self.in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[_Entry]) -> None:
        try:
            await self.send(batch)
        except BaseException as exc:
            for entry in batch:
                if not entry.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        entry.future.cancel()
                    else:
                        entry.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.in_flight -= 1
            if self.pending and not self.scheduled:
                self._flush()

    async def drain(self) -> None:
        while self.tasks or self.pending:
            if self.tasks:
                await asyncio.wait(set(self.tasks))
            elif self.pending and not self.scheduled:
                self._flush()
            else:
                await asyncio.sleep(0)


class _SQSSubscription(Subscription):
    """Pollers keep up to ``prefetch`` messages received; ``__anext__`` hands them out in receive order."""

    def __init__(self, broker: SQSBroker, queue: str, prefetch: int) -> None:
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, got {prefetch}")
        self._broker = broker
        self._queue = queue
        self._prefetch = prefetch
        self._info: _QueueInfo | None = None
        self._buffer: collections.deque[_SQSDelivery] = collections.deque()
        self._unsettled: set[_SQSDelivery] = set()
        self._by_id: dict[str, _SQSDelivery] = {}
        self._reserved = 0
        self._low_water = max(1, min(SQS_MAX_BATCH, prefetch) // 2)  # receive when this many slots are free
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._keeper: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._failing = False
        self.duplicates = 0  # copies of a held message the server handed out again (moto does under load)
        self.expired = 0  # received-ahead messages whose visibility lapsed before they were handed out

    # -- iteration ------------------------------------------------------------------------------------

    async def __anext__(self) -> Delivery:
        while True:
            if self._error is not None:
                raise self._error
            now = time.monotonic()
            while self._buffer:
                delivery = self._buffer.popleft()
                if delivery.settled:
                    continue
                if delivery.deadline <= now:
                    # Visible on the server again (maybe with someone else): handing it out would run it twice.
                    self.expired += 1
                    delivery.settled = True
                    self._release(delivery)
                    continue
                return delivery
            if self._closed:
                raise StopAsyncIteration
            if not self._tasks:
                self._start()
            self._ready.clear()
            await self._ready.wait()

    def _start(self) -> None:
        pollers = min(self._broker.options.max_receives, math.ceil(self._prefetch / SQS_MAX_BATCH))
        for index in range(pollers):
            self._tasks.append(asyncio.create_task(self._poll(), name=f"sqs-receive:{self._queue}:{index}"))
        self._keeper = asyncio.create_task(self._keep_buffer_hidden(), name=f"sqs-buffer:{self._queue}")

    def _free(self, now: float) -> int:
        # A delivery whose visibility lapsed is back on the queue: like the memory broker, it frees its slot.
        held = sum(1 for delivery in self._unsettled if delivery.deadline > now)
        return self._prefetch - held - self._reserved

    async def _wait_for_space(self, now: float) -> None:
        """Until a delivery settles, or the next visibility deadline passes."""
        self._space.clear()
        deadlines = [delivery.deadline for delivery in self._unsettled if delivery.deadline > now]
        timeout = max(0.05, min(deadlines) - now) if deadlines else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._space.wait()

    async def _poll(self) -> None:
        broker = self._broker
        options = broker.options
        backoff = 0.2
        try:
            info = self._info = self._info or await broker._lookup(self._queue)
        except Exception as exc:
            self._fail(exc)
            return
        while not self._closed:
            now = time.monotonic()
            wanted = min(SQS_MAX_BATCH, self._free(now))
            if wanted < self._low_water:  # fuller receives: fewer calls for the same messages
                await self._wait_for_space(now)
                continue
            self._reserved += wanted
            started = time.monotonic()
            try:
                response = await broker._call(
                    "receive_message",
                    f"receive from {self._queue!r}",
                    QueueUrl=info.url,
                    MaxNumberOfMessages=wanted,
                    WaitTimeSeconds=options.wait_time,
                    VisibilityTimeout=_visibility(options.visibility_timeout),
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
                )
            except (QueueNotFound, ConfigurationError) as exc:
                self._fail(exc)
                return
            except BrokerError as exc:  # throttled, a network blip, a 5xx: keep going, slower
                if not self._failing:  # one warning per outage, not one per receive and retry
                    self._failing = True
                    log.warning(
                        "receive from %r failed; retrying with back-off until it works again: %s", self._queue, exc
                    )
                else:
                    log.debug("receive from %r failed again (retrying in %.1f s): %s", self._queue, backoff, exc)
                self._reserved -= wanted
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except BaseException:
                self._reserved -= wanted
                raise
            self._reserved -= wanted
            backoff = 0.2
            if self._failing:
                self._failing = False
                log.info("receives from %r work again", self._queue)
            # The server handed the messages out between ``started`` and now: a long poll may have waited
            # seconds for them, while the answer itself takes milliseconds. Assume at most half a second.
            arrived = time.monotonic()
            deadline = max(started, arrived - 0.5) + options.visibility_timeout
            messages = response.get("Messages", ())
            if self._closed:  # closed while this receive was in flight: give its messages straight back
                await self._give_back(info, messages)
                return
            for raw in messages:
                self._accept(info, raw, deadline)
            if not messages and options.wait_time == 0:
                await asyncio.sleep(SHORT_POLL_PAUSE)  # short polling: do not spin on an empty queue

    async def _give_back(self, info: _QueueInfo, messages: Sequence[Mapping[str, Any]]) -> None:
        batcher = self._broker._batcher(info, "visibility")
        futures = [batcher.submit({"ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}) for m in messages]
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException) and not _is_gone(result):
                log.warning("could not return a message to %r after close: %s", self._queue, result)

    def _accept(self, info: _QueueInfo, raw: Mapping[str, Any], deadline: float) -> None:
        sqs_id = str(raw["MessageId"])
        held = self._by_id.get(sqs_id)
        if held is not None and held.deleting:
            # A copy of a message whose delete is under way (moto's concurrent receives): drop it, and delete
            # this copy's receipt too in case the server only honours the newest one.
            self.duplicates += 1
            future = self._broker._batcher(info, "delete").submit({"ReceiptHandle": str(raw["ReceiptHandle"])})
            future.add_done_callback(_ignore_outcome)
            return
        if held is not None and not held.settled and held.deadline > time.monotonic():
            # A second copy while ours is still hidden: impossible on SQS, seen on moto with concurrent
            # receives. Keep one delivery; the newest receipt handle is the one that settles the message.
            self.duplicates += 1
            held.receipt = str(raw["ReceiptHandle"])
            held.deadline = max(held.deadline, deadline)
            return
        try:
            body, headers, message_id, key = _decode_message(info, raw)
        except Exception as exc:  # a body we cannot even unwrap: hand it over raw, the runtime dead-letters it
            log.warning("SQS message %s on %r has an unreadable envelope: %s", sqs_id, self._queue, exc)
            body, headers, message_id, key = str(raw.get("Body", "")).encode(), {}, sqs_id, None
        attributes = raw.get("Attributes", {})
        delivery = _SQSDelivery(
            self,
            sqs_id=sqs_id,
            receipt=str(raw["ReceiptHandle"]),
            deadline=deadline,
            queue=self._queue,
            body=body,
            headers=headers,
            message_id=message_id,
            attempt=int(attributes.get("ApproximateReceiveCount", 1)),
            key=key,
        )
        self._by_id[sqs_id] = delivery
        self._unsettled.add(delivery)
        self._buffer.append(delivery)
        self._ready.set()

    async def _keep_buffer_hidden(self) -> None:
        """Extend messages received ahead that wait in the buffer, so waiting does not cost them an attempt."""
        timeout = self._broker.options.visibility_timeout
        while not self._closed:
            await asyncio.sleep(max(0.2, timeout / 3))
            if self._info is None:
                continue
            now = time.monotonic()
            due = [d for d in self._buffer if not d.settled and d.deadline - now < timeout * 2 / 3]
            results = await asyncio.gather(
                *(self._change(d, _visibility(timeout)) for d in due), return_exceptions=True
            )
            for delivery, result in zip(due, results, strict=True):
                if isinstance(result, BaseException):
                    log.debug("could not extend buffered message %s: %s", delivery.sqs_id, result)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._ready.set()

    # -- settling -------------------------------------------------------------------------------------

    def _release(self, delivery: _SQSDelivery) -> None:
        self._unsettled.discard(delivery)
        if not delivery.deleting and self._by_id.get(delivery.sqs_id) is delivery:
            del self._by_id[delivery.sqs_id]
        self._space.set()

    async def _settle(self, delivery: _SQSDelivery, visibility: int | None) -> None:
        info = self._info
        assert info is not None  # a delivery exists only after the queue was looked up
        # Settled from now on (as on every backend): its prefetch slot is free while the call is under way.
        if visibility is not None:
            self._release(delivery)
            await self._change(delivery, visibility)
            return
        delivery.deleting = True  # until the delete is done, copies of this message are duplicates
        self._release(delivery)
        try:
            await self._broker._batcher(info, "delete").submit({"ReceiptHandle": delivery.receipt})
        except _SQSError as exc:
            if exc.code != "ReceiptHandleIsInvalid":
                raise
            # Already deleted (a duplicate's ack), or received again elsewhere, which then owns it: AWS itself
            # answers such deletes with success.
            log.info("ack of message %s on %r: %s", delivery.sqs_id, self._queue, exc)
        finally:
            delivery.deleting = False
            if self._by_id.get(delivery.sqs_id) is delivery:
                del self._by_id[delivery.sqs_id]

    async def _change(self, delivery: _SQSDelivery, visibility: int) -> None:
        info = self._info
        assert info is not None
        started = time.monotonic()
        await self._broker._batcher(info, "visibility").submit(
            {"ReceiptHandle": delivery.receipt, "VisibilityTimeout": visibility}
        )
        delivery.deadline = started + visibility

    async def _extend(self, delivery: _SQSDelivery, seconds: float) -> None:
        await self._change(delivery, _visibility(seconds))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        self._space.set()
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._tasks:
            await asyncio.sleep(0)  # pollers waiting for space see the close and end
            # A receive in flight is not cancelled (the server may be answering it, and cancelling would
            # strand its messages until their visibility timeout): it ends by itself and gives back what it
            # got at once. The broker's close() waits for such receives, then cancels what is left.
            for task in self._tasks:
                if not task.done():
                    self._broker._stragglers.add(task)
                    task.add_done_callback(self._broker._stragglers.discard)
        leftovers = [d for d in self._unsettled if not d.settled]
        self._buffer.clear()
        for delivery in leftovers:
            delivery.settled = True
        if leftovers and self._info is not None:
            # Extensions of buffered messages still under way must not land after the returns below.
            await self._broker._batcher(self._info, "visibility").drain()
            results = await asyncio.gather(*(self._change(d, 0) for d in leftovers), return_exceptions=True)
            for delivery, result in zip(leftovers, results, strict=True):
                if isinstance(result, BaseException) and not _is_gone(result):
                    log.warning(
                        "could not return message %s to %r on close (it returns after its visibility timeout): %s",
                        delivery.sqs_id,
                        self._queue,
                        result,
                    )
        self._unsettled.clear()
        self._by_id.clear()
        self._broker._subscriptions.discard(self)


def _ignore_outcome(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not report it


def _is_gone(exc: BaseException) -> bool:
    """The message is no longer ours to change (already visible again, or deleted)."""
    return isinstance(exc, BrokerError) and getattr(exc, "code", "") in _GONE


class _SQSError(BrokerError):
    """SQS refused a request (or one entry of a batch); ``code`` is SQS's error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class SQSBroker(Broker):
    """Amazon SQS (or a server speaking its API) through aiobotocore. See the module docstring.

    Example:
        >>> broker = SQSBroker.from_url("sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324")
        >>> broker.capabilities.max_batch
        10
    """

    def __init__(self, options: SQSOptions | None = None) -> None:
        self.options = options or SQSOptions()
        self.capabilities = Capabilities(
            name="sqs",
            max_message_bytes=self.options.max_message_bytes - HEADER_ALLOWANCE,
            durable=True,
            ordered=True,  # on .fifo queues, per message key (group)
            fanout=False,
            native_dead_letter=True,
            native_delay=True,
            visibility_timeout=self.options.visibility_timeout,
            max_batch=SQS_MAX_BATCH,
            max_delay=float(SQS_MAX_DELAY),
        )
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._queues: dict[str, _QueueInfo] = {}
        self._lookups: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._batchers: dict[tuple[str, str], _Batcher] = {}
        self._fifo_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._subscriptions: set[_SQSSubscription] = set()
        self._stragglers: set[asyncio.Task[None]] = set()  # receives still running for closed subscriptions

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQSBroker:
        """Build from ``sqs://[region]/?param=value...``; ``options`` override the query parameters."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"bad SQS URL {redact_url(url)!r}: {exc}") from None
        if parts.username or parts.password:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)!r} carries credentials; they come from the AWS environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or profile=, or an instance role)"
            )
        params: dict[str, Any] = dict(parse_qsl(parts.query))
        params.update(options)
        values: dict[str, Any] = {"region": parts.hostname or options.get("region") or None}
        params.pop("region", None)
        for name, raw in params.items():
            converter = _CONVERTERS.get(name)
            if converter is None:
                hint = difflib.get_close_matches(name, list(_CONVERTERS), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigurationError(
                    f"unknown SQS URL parameter {name!r}{suggestion} (known: {', '.join(sorted(_CONVERTERS))})"
                )
            if raw is None or not isinstance(raw, str):
                values[name] = raw
                continue
            try:
                values[name] = converter(raw)
            except (ValueError, KeyError):
                raise ConfigurationError(f"SQS URL parameter {name}={raw!r} is not a valid value") from None
        return cls(SQSOptions(**values))

    # -- connection -----------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError

        session = get_session()
        if self.options.profile:
            session.set_config_variable("profile", self.options.profile)
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.create_client(
                    "sqs",
                    region_name=self.options.region,
                    endpoint_url=self.options.endpoint_url,
                    config=AioConfig(
                        max_pool_connections=self.options.max_connections,
                        read_timeout=60,
                        retries={"mode": "standard"},
                    ),
                )
            )
        except BotoCoreError as exc:
            await stack.aclose()
            raise ConfigurationError(f"cannot set up the SQS client: {exc}") from exc
        self._stack = stack
        self._client = client
        try:
            await self._call("list_queues", "connect", MaxResults=1, QueueNamePrefix="taskstream-connect-check")
        except _SQSError as exc:
            if exc.code in _AUTH_FAILED:
                await self.close()
                raise BrokerConnectionError(f"SQS refused the AWS credentials: {exc}") from exc
            # Reached SQS with usable credentials; only listing queues is not allowed (a narrow IAM policy).
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(subscription.close() for subscription in list(self._subscriptions)))
        if self._stragglers:
            grace = self.options.close_grace
            if grace is None:
                grace = self.options.wait_time + 2.0
            _, running = await asyncio.wait(set(self._stragglers), timeout=grace)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        for batcher in list(self._batchers.values()):
            await batcher.drain()
        self._batchers.clear()
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    async def _call(self, operation: str, action: str, **kwargs: Any) -> Any:
        """Call one SQS operation, mapping driver errors onto taskstream's."""
        if self._client is None:
            raise BrokerConnectionError("SQS broker is not connected (use 'async with' or connect())")
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            NoRegionError,
        )

        try:
            return await getattr(self._client, operation)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "")) or str(error.get("QueryErrorCode", ""))
            message = error.get("Message", "")
            if code in _NOT_FOUND or error.get("QueryErrorCode") == "QueueDoesNotExist":
                raise QueueNotFound(f"{action}: the SQS queue does not exist ({message})") from exc
            mapped = _SQSError(f"{action} failed: SQS {code}: {message}", code)
            raise mapped from exc
        except NoCredentialsError as exc:
            raise ConfigurationError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                "(or profile= in the URL), or run with an instance role"
            ) from exc
        except NoRegionError as exc:
            raise ConfigurationError(
                "no AWS region: put it in the URL (sqs://us-east-1/) or set AWS_DEFAULT_REGION"
            ) from exc
        except (ConnectionError, HTTPClientError, OSError) as exc:
            where = redact_url(self.options.endpoint_url or "AWS")
            raise BrokerConnectionError(f"{action}: cannot reach SQS at {where}: {exc}") from exc
        except BotoCoreError as exc:
            raise BrokerError(f"{action} failed: {exc}") from exc

    # -- queues ---------------------------------------------------------------------------------------

    def sqs_name(self, queue: str) -> str:
        """The SQS queue name of taskstream queue ``queue`` (prefix added, ``.`` mapped to ``-``).

        Raises:
            ConfigurationError: the name has characters SQS does not allow, or is too long.
        """
        fifo = queue.endswith(".fifo")
        stem = queue[: -len(".fifo")] if fifo else queue
        name = self.options.queue_prefix + stem.replace(".", "-")
        if not _QUEUE_NAME.match(name):
            raise ConfigurationError(
                f"queue name {queue!r} may hold only letters, digits, '-', '_' and '.' (SQS queue names)"
            )
        if fifo:
            name += ".fifo"
        if len(name) > 80:
            raise ConfigurationError(f"SQS queue name {name!r} is longer than 80 characters")
        return name

    async def _lookup(self, queue: str, *, create: Mapping[str, str] | None = None) -> _QueueInfo:
        """The cached facts of ``queue``; look it up (or create it with ``create`` attributes) on a miss."""
        info = self._queues.get(queue)
        if info is not None:
            return info
        async with self._lookups[queue]:
            info = self._queues.get(queue)
            if info is not None:
                return info
            sqs_name = self.sqs_name(queue)
            try:
                url = (await self._call("get_queue_url", f"look up {queue!r}", QueueName=sqs_name))["QueueUrl"]
            except QueueNotFound:
                if create is None:
                    raise QueueNotFound(
                        f"SQS queue {sqs_name!r} (for {queue!r}) does not exist; declare it first"
                        + ("" if self.options.create_queues else " or create it (create_queues is off)")
                    ) from None
                url = await self._create(queue, sqs_name, create)
            attributes = (
                await self._call(
                    "get_queue_attributes",
                    f"read the attributes of {queue!r}",
                    QueueUrl=url,
                    AttributeNames=["MaximumMessageSize", "QueueArn", "RedrivePolicy", "FifoQueue"],
                )
            ).get("Attributes", {})
            info = _QueueInfo(
                name=queue,
                sqs_name=sqs_name,
                url=url,
                fifo=attributes.get("FifoQueue", "false").lower() == "true" or sqs_name.endswith(".fifo"),
                max_bytes=int(attributes.get("MaximumMessageSize", DEFAULT_MAX_MESSAGE_BYTES)),
                arn=str(attributes.get("QueueArn", "")),
                redrive=attributes.get("RedrivePolicy"),
            )
            self._queues[queue] = info
            return info

    async def _create(self, queue: str, sqs_name: str, attributes: Mapping[str, str]) -> str:
        try:
            response = await self._call(
                "create_queue", f"create {queue!r}", QueueName=sqs_name, Attributes=dict(attributes)
            )
        except _SQSError as exc:
            if exc.code not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
            # Created at the same moment with other attributes: use the one that won.
            response = await self._call("get_queue_url", f"look up {queue!r}", QueueName=sqs_name)
        return str(response["QueueUrl"])

    def _max_receive_count(self) -> int:
        if self.options.max_receive_count is not None:
            return self.options.max_receive_count
        from taskstream.settings import Settings

        return max(1, min(1000, Settings().max_attempts))

    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        """Create ``queue`` if missing (look it up when ``create_queues`` is off).

        A ``.fifo`` name makes a FIFO queue; ``fifo=True`` needs that name. With ``dead_letter`` the queue gets
        a RedrivePolicy to it (``maxReceiveCount`` = ``max_receive_count``); the dead-letter queue is declared
        too when missing.

        Raises:
            ConfigurationError: a bad name, or ``fifo=True`` without the ``.fifo`` suffix SQS requires.
            NotSupported: ``topics`` (no fan-out on SQS).
            QueueNotFound: the queue is missing and ``create_queues`` is off.
        """
        if topics:
            raise NotSupported("the sqs backend has no topic pub/sub (Capabilities.fanout is False)")
        is_fifo = queue.endswith(".fifo")
        if fifo and not is_fifo:
            raise ConfigurationError(f"SQS FIFO queue names end in '.fifo'; got {queue!r}")
        attributes: dict[str, str] = {
            "VisibilityTimeout": str(_visibility(self.options.visibility_timeout)),
            "MaximumMessageSize": str(self.options.max_message_bytes),
        }
        if is_fifo:
            attributes["FifoQueue"] = "true"
        redrive: str | None = None
        if dead_letter is not None:
            if dead_letter.endswith(".fifo") != is_fifo:
                raise ConfigurationError(
                    f"dead-letter queue {dead_letter!r} of {queue!r} must be FIFO exactly when the queue is"
                )
            if dead_letter not in self._queues:
                await self.declare(dead_letter)
            target = await self._lookup(dead_letter)
            redrive = orjson.dumps(
                {"deadLetterTargetArn": target.arn, "maxReceiveCount": self._max_receive_count()}
            ).decode()
            attributes["RedrivePolicy"] = redrive
        info = await self._lookup(queue, create=attributes if self.options.create_queues else None)
        if redrive is not None and info.redrive is None and self.options.create_queues:
            await self._call(
                "set_queue_attributes",
                f"set the dead-letter queue of {queue!r}",
                QueueUrl=info.url,
                Attributes={"RedrivePolicy": redrive},
            )
            info.redrive = redrive

    def dead_letter_name(self, queue: str) -> str:
        """``<queue>-dlq`` (``<stem>-dlq.fifo`` for FIFO queues): a valid SQS name as it is."""
        if queue.endswith(".fifo"):
            return queue[: -len(".fifo")] + "-dlq.fifo"
        return f"{queue}-dlq"

    async def delete_queue(self, queue: str) -> None:
        try:
            info = await self._lookup(queue)
        except QueueNotFound:
            return
        self._queues.pop(queue, None)
        for op in ("delete", "visibility", "send"):
            self._batchers.pop((info.url, op), None)
        with contextlib.suppress(QueueNotFound):
            await self._call("delete_queue", f"delete {queue!r}", QueueUrl=info.url)

    async def purge(self, queue: str) -> None:
        info = await self._lookup(queue)
        try:
            await self._call("purge_queue", f"purge {queue!r}", QueueUrl=info.url)
        except _SQSError as exc:
            if exc.code not in ("AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress"):
                raise
            await self._drain(info)

    async def _drain(self, info: _QueueInfo) -> None:
        """Purge the slow way (SQS allows one PurgeQueue per 60 s): receive and delete until empty."""
        while True:
            response = await self._call(
                "receive_message",
                f"drain {info.name!r}",
                QueueUrl=info.url,
                MaxNumberOfMessages=SQS_MAX_BATCH,
                WaitTimeSeconds=0,
                VisibilityTimeout=60,
            )
            messages = response.get("Messages", [])
            if not messages:
                return
            await self._call(
                "delete_message_batch",
                f"drain {info.name!r}",
                QueueUrl=info.url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )

    async def depth(self, queue: str) -> int:
        info = await self._lookup(queue)
        response = await self._call(
            "get_queue_attributes",
            f"read the depth of {queue!r}",
            QueueUrl=info.url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"],
        )
        attributes = response.get("Attributes", {})
        return int(attributes.get("ApproximateNumberOfMessages", 0)) + int(
            attributes.get("ApproximateNumberOfMessagesDelayed", 0)
        )

    # -- publishing -----------------------------------------------------------------------------------

    def _entry(self, info: _QueueInfo, message: OutgoingMessage) -> tuple[dict[str, Any], int]:
        """One SendMessage(Batch) entry and its size as SQS counts it; raises ``MessageTooLarge``."""
        body = message.body
        limit = self.capabilities.max_message_bytes
        if len(body) > limit:
            raise MessageTooLarge(len(body), limit, "sqs")
        packed: dict[str, Any] = {"id": message.message_id or new_id()}
        if message.headers:
            packed["h"] = dict(message.headers)
        if message.key is not None:
            packed["k"] = message.key
        text: str | None
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or _NOT_SQS_TEXT.search(text):
            text = base64.b64encode(body).decode("ascii")
            packed["e"] = "b64"
        try:
            attribute = orjson.dumps(packed).decode()
        except TypeError as exc:
            raise ConfigurationError(f"message headers must be JSON-compatible: {exc}") from None
        size = len(text.encode("utf-8")) + len(ATTRIBUTE) + len("String") + len(attribute.encode("utf-8"))
        if size > info.max_bytes:
            raise MessageTooLarge(size, info.max_bytes, f"SQS queue {info.sqs_name!r} (body, base64 and headers)")
        entry: dict[str, Any] = {
            "MessageBody": text,
            "MessageAttributes": {ATTRIBUTE: {"DataType": "String", "StringValue": attribute}},
        }
        if info.fifo:
            if message.delay:
                raise NotSupported(f"SQS FIFO queue {info.name!r} has no per-message delay (publish without delay=)")
            entry["MessageGroupId"] = _sqs_id(message.key) if message.key is not None else DEFAULT_GROUP
            entry["MessageDeduplicationId"] = _sqs_id(packed["id"])
        elif message.delay:
            if not 0 <= message.delay <= SQS_MAX_DELAY:
                raise ConfigurationError(f"SQS delays are 0 to {SQS_MAX_DELAY} s, got {message.delay}")
            entry["DelaySeconds"] = math.ceil(message.delay)
        return entry, size

    def _batcher(self, info: _QueueInfo, op: str) -> _Batcher:
        key = (info.url, op)
        batcher = self._batchers.get(key)
        if batcher is None:

            async def send(entries: list[_Entry]) -> None:
                await self._send_entries(info, op, entries)

            # FIFO sends go one call at a time, so calls reach SQS in the order they were made.
            batcher = self._batchers[key] = _Batcher(
                send,
                max_bytes=info.max_bytes if op == "send" else 0,
                max_in_flight=1 if info.fifo and op == "send" else 4,
            )
        return batcher

    async def _send_entries(self, info: _QueueInfo, op: str, entries: list[_Entry]) -> None:
        operation, action = {
            "send": ("send_message_batch", f"publish to {info.name!r}"),
            "delete": ("delete_message_batch", f"ack on {info.name!r}"),
            "visibility": ("change_message_visibility_batch", f"change visibility on {info.name!r}"),
        }[op]
        try:
            response = await self._call(
                operation,
                action,
                QueueUrl=info.url,
                Entries=[{"Id": str(i), **entry.request} for i, entry in enumerate(entries)],
            )
        except _SQSError as exc:
            if op == "send":
                raise PublishError(str(exc)) from exc
            raise
        failed = {str(f["Id"]): f for f in response.get("Failed", ())}
        for index, entry in enumerate(entries):
            if entry.future.done():
                continue
            failure = failed.get(str(index))
            if failure is None:
                entry.future.set_result(None)
                continue
            code = str(failure.get("Code", ""))
            text = f"{action} failed: SQS {code}: {failure.get('Message', '')}"
            entry.future.set_exception(PublishError(text) if op == "send" else _SQSError(text, code))

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        key: str | None = None,
        delay: float | None = None,
    ) -> None:
        """Send one message; concurrent publishes to one queue share ``SendMessageBatch`` calls."""
        info = await self._lookup(queue)
        entry, size = self._entry(info, OutgoingMessage(body, dict(headers or {}), message_id, key, delay))
        await self._batcher(info, "send").submit(entry, size)

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Send in calls of up to 10 messages (and the queue's size limit); FIFO calls go one after another."""
        if not messages:
            return
        info = await self._lookup(queue)
        prepared = [self._entry(info, message) for message in messages]  # every size checked before sending
        chunks: list[list[tuple[dict[str, Any], int]]] = [[]]
        total = 0
        for entry, size in prepared:
            chunk = chunks[-1]
            if chunk and (len(chunk) >= SQS_MAX_BATCH or total + size > info.max_bytes):
                chunks.append([])
                total = 0
            chunks[-1].append((entry, size))
            total += size

        async def send(chunk: list[tuple[dict[str, Any], int]]) -> None:
            loop = asyncio.get_running_loop()
            entries = [_Entry(entry, size, loop.create_future()) for entry, size in chunk]
            await self._send_entries(info, "send", entries)
            errors = [e.future.exception() for e in entries if e.future.exception() is not None]
            if errors:
                raise PublishError(f"{len(errors)} of {len(entries)} messages were not sent; first: {errors[0]}")

        if info.fifo:
            # Callers may pipeline batches (Producer.send_many does); the fair lock keeps their call order.
            async with self._fifo_locks[queue]:
                await self._batcher(info, "send").drain()  # single publishes made earlier go first
                for chunk in chunks:
                    await send(chunk)
            return
        results = await asyncio.gather(*(send(chunk) for chunk in chunks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- consuming ------------------------------------------------------------------------------------

    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        if self._client is None:
            raise BrokerConnectionError("SQS broker is not connected (use 'async with' or connect())")
        self.sqs_name(queue)  # a bad name fails here, not in the first receive
        subscription = _SQSSubscription(self, queue, prefetch)
        subscription._info = self._queues.get(queue)
        self._subscriptions.add(subscription)
        return subscription

    def __repr__(self) -> str:
        endpoint = redact_url(self.options.endpoint_url) if self.options.endpoint_url else "aws"
        return (
            f"<SQSBroker region={self.options.region!r} endpoint={endpoint!r} "
            f"prefix={self.options.queue_prefix!r} queues={len(self._queues)}>"
        )


def _sqs_id(value: str) -> str:
    """A valid group / deduplication id: ``value`` itself when SQS accepts it, else its SHA-256."""
    if _SQS_ID.match(value):
        return value
    import hashlib

    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _decode_message(info: _QueueInfo, raw: Mapping[str, Any]) -> tuple[bytes, dict[str, Any], str, str | None]:
    """Body, headers, message id and key of one received SQS message (ours or a plain producer's)."""
    attributes: Mapping[str, Any] = raw.get("MessageAttributes") or {}
    headers: dict[str, Any] = {}
    packed: dict[str, Any] = {}
    for name, value in attributes.items():
        data_type = str(value.get("DataType", "String"))
        if name == ATTRIBUTE and data_type == "String":
            loaded = orjson.loads(value.get("StringValue", "{}"))
            packed = loaded if isinstance(loaded, dict) else {}
        elif data_type.startswith("Number"):
            headers[name] = _number(str(value.get("StringValue", "0")))
        elif data_type.startswith("Binary"):
            headers[name] = base64.b64encode(bytes(value.get("BinaryValue", b""))).decode("ascii")
        else:
            headers[name] = value.get("StringValue", "")
    own = packed.get("h")
    if isinstance(own, dict):
        headers.update(own)
    text = str(raw.get("Body", ""))
    body = base64.b64decode(text) if packed.get("e") == "b64" else text.encode("utf-8")
    message_id = str(packed.get("id") or raw["MessageId"])
    key = packed.get("k")
    if not packed and info.fifo:
        group = raw.get("Attributes", {}).get("MessageGroupId")  # a plain FIFO producer's group is its key
        key = str(group) if group is not None else None
    return body, headers, message_id, key if key is None else str(key)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)

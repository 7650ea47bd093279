"""The SQS broker: connection, queues (names, lookup, creation, redrive), publishing and consuming."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from taskstream.brokers.base import Broker, Capabilities, OutgoingMessage, QueueStats, Subscription
from taskstream.brokers.sqs.client import AUTH_FAILED, Batcher, Entry, SQSClient, SQSError, was_cut
from taskstream.brokers.sqs.codec import QueueInfo, encode_entry
from taskstream.brokers.sqs.config import (
    CUT_RETRY_PAUSE,
    CUT_RETRY_WINDOW,
    HEADER_ALLOWANCE,
    OPTIONS,
    QUEUE_NAME,
    SQS_MAX_BATCH,
    SQS_MAX_DELAY,
    SQS_MAX_MESSAGE_BYTES,
    SQSOptions,
    visibility,
)
from taskstream.brokers.sqs.subscription import SQSSubscription
from taskstream.errors import (
    BrokerConnectionError,
    ConfigurationError,
    NotSupported,
    PublishError,
    QueueNotFound,
)
from taskstream.settings import DEFAULT_MAX_ATTEMPTS, Settings, redact_url
from taskstream.urloptions import split_query

__all__ = ["SQSBroker"]


class SQSBroker(Broker):
    """Amazon SQS (or a server speaking its API) through aiobotocore (``docs/brokers.md``, section SQS).

    Example:
        >>> broker = SQSBroker.from_url("sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324")
        >>> broker.capabilities.max_batch
        10
    """

    def __init__(self, options: SQSOptions | None = None, *, settings: Settings | None = None) -> None:
        """Set up (no connection yet).

        Args:
            options: the broker's settings; the defaults without.
            settings: the process settings; their ``max_attempts`` is the default ``max_receive_count``
                (:data:`~taskstream.settings.DEFAULT_MAX_ATTEMPTS` without them). Never read from the
                environment here.
        """
        self.options = options or SQSOptions()
        self._max_attempts = settings.max_attempts if settings is not None else DEFAULT_MAX_ATTEMPTS
        self.capabilities = Capabilities(
            name="sqs",
            max_message_bytes=self.options.max_message_bytes - HEADER_ALLOWANCE,
            durable=True,
            ordered=True,  # on .fifo queues, per message key (group)
            fanout=False,
            visibility_timeout=self.options.visibility_timeout,
            max_batch=SQS_MAX_BATCH,
            max_delay=float(SQS_MAX_DELAY),
            reports_in_flight=True,
        )
        self._client = SQSClient(self.options)
        self._queues: dict[str, QueueInfo] = {}
        self._lookups: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._fifo_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._subscriptions: set[SQSSubscription] = set()
        self._stragglers: set[asyncio.Task[None]] = set()  # receives still running for closed subscriptions

    @property
    def redrive_count(self) -> int:
        """``maxReceiveCount`` of the RedrivePolicy ``declare`` sets: ``max_receive_count``, else ``max_attempts``."""
        return self.options.redrive_count(self._max_attempts)

    @property
    def _limit(self) -> int:
        return self.capabilities.max_message_bytes

    @classmethod
    def from_url(cls, url: str, *, settings: Settings | None = None, **options: Any) -> SQSBroker:
        """Build from ``sqs://[region]/?param=value...``; ``options`` override the query parameters.

        Raises:
            ConfigurationError: a bad URL, credentials in it, an unknown parameter or a bad value.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigurationError(f"bad SQS URL {redact_url(url)!r}: {exc}") from None
        if parts.username or parts.password:
            raise ConfigurationError(
                f"SQS URL {redact_url(url)!r} carries credentials; they come from the AWS environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or profile=, or an instance role)"
            )
        overrides = dict(options)
        region = parts.hostname or overrides.pop("region", None) or None  # ?region= in the query is ignored
        query = {name: value for name, value in split_query(parts.query).items() if name != "region"}
        values = OPTIONS.parse(query, overrides, url=url)
        return cls(SQSOptions(region=region, **values), settings=settings)

    # -- connection -----------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client.connected:
            return
        await self._client.open()
        try:
            await self._call("list_queues", "connect", MaxResults=1, QueueNamePrefix="taskstream-connect-check")
        except SQSError as exc:
            if exc.code in AUTH_FAILED:
                await self.close()
                raise BrokerConnectionError(f"SQS refused the AWS credentials: {exc}") from exc
            # Reached SQS with usable credentials; only listing queues is not allowed (a narrow IAM policy).
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(subscription.close() for subscription in list(self._subscriptions)))
        if self._stragglers:
            _, running = await asyncio.wait(set(self._stragglers), timeout=self.options.grace())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        for batcher in list(self._batchers.values()):
            await batcher.drain()
        self._batchers.clear()
        await self._client.aclose()

    async def _call(self, operation: str, action: str, **kwargs: Any) -> Any:
        """Call one SQS operation, mapping driver errors onto taskstream's."""
        return await self._client.call(operation, action, **kwargs)

    # -- queues ---------------------------------------------------------------------------------------

    def sqs_name(self, queue: str) -> str:
        """The SQS queue name of taskstream queue ``queue`` (prefix added, ``.`` mapped to ``-``).

        Raises:
            ConfigurationError: the name has characters SQS does not allow, or is too long.
        """
        fifo = queue.endswith(".fifo")
        stem = queue[: -len(".fifo")] if fifo else queue
        name = self.options.queue_prefix + stem.replace(".", "-")
        if not QUEUE_NAME.match(name):
            raise ConfigurationError(
                f"queue name {queue!r} may hold only letters, digits, '-', '_' and '.' (SQS queue names)"
            )
        if fifo:
            name += ".fifo"
        if len(name) > 80:
            raise ConfigurationError(f"SQS queue name {name!r} is longer than 80 characters")
        return name

    async def _lookup(self, queue: str, *, create: Mapping[str, str] | None = None) -> QueueInfo:
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
            info = QueueInfo(
                name=queue,
                sqs_name=sqs_name,
                url=url,
                fifo=attributes.get("FifoQueue", "false").lower() == "true" or sqs_name.endswith(".fifo"),
                max_bytes=int(attributes.get("MaximumMessageSize", SQS_MAX_MESSAGE_BYTES)),
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
        except SQSError as exc:
            if exc.code not in ("QueueAlreadyExists", "QueueNameExists"):
                raise
            # Created at the same moment with other attributes: use the one that won.
            response = await self._call("get_queue_url", f"look up {queue!r}", QueueName=sqs_name)
        return str(response["QueueUrl"])

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
            "VisibilityTimeout": str(visibility(self.options.visibility_timeout)),
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
            redrive = orjson.dumps({"deadLetterTargetArn": target.arn, "maxReceiveCount": self.redrive_count}).decode()
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
        except SQSError as exc:
            if exc.code not in ("AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress"):
                raise
            await self._drain(info)

    async def _drain(self, info: QueueInfo) -> None:
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
        stats = await self.queue_stats(queue)
        return stats.depth or 0

    async def queue_stats(self, queue: str) -> QueueStats:
        """SQS's approximate counts; it does not say how many consumers poll a queue (``None``).

        Depth is ``ApproximateNumberOfMessages`` + ``ApproximateNumberOfMessagesDelayed``; in flight is
        ``ApproximateNumberOfMessagesNotVisible`` (received, not yet deleted or returned).
        """
        info = await self._lookup(queue)
        response = await self._call(
            "get_queue_attributes",
            f"read the figures of {queue!r}",
            QueueUrl=info.url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        attributes = response.get("Attributes", {})
        depth = int(attributes.get("ApproximateNumberOfMessages", 0)) + int(
            attributes.get("ApproximateNumberOfMessagesDelayed", 0)
        )
        return QueueStats(depth, int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)), None)

    # -- publishing -----------------------------------------------------------------------------------

    def _batcher(self, info: QueueInfo, op: str) -> Batcher:
        key = (info.url, op)
        batcher = self._batchers.get(key)
        if batcher is None:

            async def send(entries: list[Entry]) -> None:
                await self._send_entries(info, op, entries)

            # FIFO sends go one call at a time, so calls reach SQS in the order they were made.
            batcher = self._batchers[key] = Batcher(
                send,
                max_bytes=info.max_bytes if op == "send" else 0,
                max_in_flight=1 if info.fifo and op == "send" else 4,
            )
        return batcher

    async def _send_entries(self, info: QueueInfo, op: str, entries: list[Entry]) -> None:
        operation, action = {
            "send": ("send_message_batch", f"publish to {info.name!r}"),
            "delete": ("delete_message_batch", f"ack on {info.name!r}"),
            "visibility": ("change_message_visibility_batch", f"change visibility on {info.name!r}"),
        }[op]
        request = [{"Id": str(i), **entry.request} for i, entry in enumerate(entries)]
        deadline: float | None = None
        while True:
            try:
                response = await self._call(operation, action, QueueUrl=info.url, Entries=request)
                break
            except SQSError as exc:
                if op == "send":
                    raise PublishError(str(exc)) from exc
                raise
            except BrokerConnectionError as exc:
                # Cut mid-request: sent again (it may arrive twice), so a short cut never fails a publish.
                if op != "send" or not was_cut(exc):
                    raise
                now = asyncio.get_running_loop().time()
                deadline = now + CUT_RETRY_WINDOW if deadline is None else deadline
                if now >= deadline:
                    raise
                await asyncio.sleep(CUT_RETRY_PAUSE)
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
            entry.future.set_exception(PublishError(text) if op == "send" else SQSError(text, code))

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
        entry, size = encode_entry(
            info, OutgoingMessage(body, dict(headers or {}), message_id, key, delay), self._limit
        )
        await self._batcher(info, "send").submit(entry, size)

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Send in calls of up to 10 messages (and the queue's size limit); FIFO calls go one after another."""
        if not messages:
            return
        info = await self._lookup(queue)
        prepared = [
            encode_entry(info, message, self._limit) for message in messages
        ]  # every size checked before sending
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
            entries = [Entry(entry, size, loop.create_future()) for entry, size in chunk]
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
        if not self._client.connected:
            raise BrokerConnectionError("SQS broker is not connected (use 'async with' or connect())")
        self.sqs_name(queue)  # a bad name fails here, not in the first receive
        subscription = SQSSubscription(self, queue, prefetch, self._queues.get(queue))
        self._subscriptions.add(subscription)
        return subscription

    def __repr__(self) -> str:
        endpoint = redact_url(self.options.endpoint_url) if self.options.endpoint_url else "aws"
        return (
            f"<SQSBroker region={self.options.region!r} endpoint={endpoint!r} "
            f"prefix={self.options.queue_prefix!r} queues={len(self._queues)}>"
        )

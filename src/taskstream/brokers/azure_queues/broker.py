"""The Azure Storage Queues broker: connection, queues, publishing (size-checked frames) and consuming."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from taskstream.brokers.azure_queues.codec import decode_frame, encode_frame
from taskstream.brokers.azure_queues.config import (
    AZURE_MAX_MESSAGE_TEXT,
    AZURE_QUEUE_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_VISIBILITY_TIMEOUT,
    MAX_PAGE,
    MAX_VISIBILITY,
    POISON_SUFFIX,
    broker_arguments,
    endpoint_of,
    native_queue_name,
    parse_connection_string,
)
from taskstream.brokers.azure_queues.errors import check_delay, map_error, whole_seconds
from taskstream.brokers.azure_queues.subscription import AzureQueueDelivery, AzureQueueSubscription
from taskstream.brokers.base import Broker, Capabilities, OutgoingMessage, QueueStats, Subscription
from taskstream.errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MessageTooLarge,
    NotSupported,
    PublishError,
)
from taskstream.messages import new_id
from taskstream.settings import redact_url

__all__ = ["AzureQueueBroker"]


class AzureQueueBroker(Broker):
    """Azure Storage Queues (and Azurite). ``docs/brokers.md`` maps its operations and URL forms.

    Example:
        >>> broker = AzureQueueBroker.from_url("azurequeue://devstorage", visibility_timeout=10)
        >>> broker.capabilities.visibility_timeout
        10.0
    """

    def __init__(
        self,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
        visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        message_ttl: int = -1,
        max_message_bytes: int = AZURE_QUEUE_MAX_MESSAGE_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        foreign_encoding: str = "text",
        api_version: str | None = None,
    ) -> None:
        if (connection_string is None) == (account_url is None):
            raise ConfigurationError("give the Azure queue broker either a connection string or an account URL")
        if connection_string is not None:
            self._endpoint = endpoint_of(parse_connection_string(connection_string))
        else:
            assert account_url is not None
            if credential is None:
                raise ConfigurationError(
                    f"no credential for Azure account URL {redact_url(account_url)!r}: pass credential=..., or set "
                    "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN"
                )
            self._endpoint = account_url.split("?", 1)[0].rstrip("/")
        if not 1 <= visibility_timeout <= MAX_VISIBILITY:
            raise ConfigurationError(f"visibility_timeout must be 1 s to 7 days, got {visibility_timeout}")
        if poll_interval <= 0:
            raise ConfigurationError(f"poll_interval must be positive, got {poll_interval}")
        if not 1 <= max_message_bytes <= (AZURE_MAX_MESSAGE_TEXT // 4) * 3:
            raise ConfigurationError(
                f"max_message_bytes must be 1 to {(AZURE_MAX_MESSAGE_TEXT // 4) * 3} (64 KiB of base64), "
                f"got {max_message_bytes}"
            )
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if foreign_encoding not in ("text", "base64"):
            raise ConfigurationError(f"foreign_encoding must be 'text' or 'base64', got {foreign_encoding!r}")
        if message_ttl != -1 and message_ttl < 1:
            raise ConfigurationError(f"message_ttl must be -1 (never expire) or at least 1 s, got {message_ttl}")
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential
        self.visibility_timeout = math.ceil(visibility_timeout)
        self.poll_interval = float(poll_interval)
        self.message_ttl = message_ttl
        self.foreign_encoding = foreign_encoding
        self.api_version = api_version
        self.max_in_flight = max_in_flight
        self.capabilities = Capabilities(
            name="azure",
            max_message_bytes=max_message_bytes,
            durable=True,
            ordered=False,
            fanout=False,
            visibility_timeout=float(self.visibility_timeout),
            max_batch=MAX_PAGE,
            max_delay=float(MAX_VISIBILITY),
            depth_counts_in_flight=True,
        )
        self._service: QueueServiceClient | None = None
        self._clients: dict[str, QueueClient] = {}
        self._declared: set[str] = set()
        self._subscriptions: set[AzureQueueSubscription] = set()
        self._send_slots: asyncio.Semaphore | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AzureQueueBroker:
        """Build a broker from an ``azurequeue://`` URL (``docs/brokers.md``); ``options`` win over the query.

        Raises:
            ConfigurationError: a bad URL, an unknown parameter (named, with a "did you mean"), a bad value, or
                no way to authenticate.
        """
        return cls(**broker_arguments(url, options))

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._service is not None:
            return
        kwargs: dict[str, Any] = {
            # Fail in seconds, not minutes, when the service is unreachable (SDK default: 15 s, 18 s, 24 s).
            "retry_total": 3,
            "initial_backoff": 1,
            "increment_base": 2,
            "random_jitter_range": 0.5,
            "connection_timeout": 10,
        }
        if self.api_version:
            kwargs["api_version"] = self.api_version
        try:
            if self._connection_string is not None:
                service = QueueServiceClient.from_connection_string(self._connection_string, **kwargs)
            else:
                service = QueueServiceClient(self._account_url or "", credential=self._credential, **kwargs)
            await service.__aenter__()
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot use the Azure Storage configuration for {self._endpoint!r}: {type(exc).__name__}"
            ) from None
        except AzureError as exc:
            raise map_error(exc, f"connect to {self._endpoint!r}") from exc
        self._service = service
        self._send_slots = asyncio.Semaphore(self.max_in_flight)

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        service, self._service = self._service, None
        self._clients.clear()
        self._declared.clear()
        if service is not None:
            with contextlib.suppress(Exception):
                await service.close()

    def _client(self, queue: str) -> QueueClient:
        client = self._clients.get(queue)
        if client is None:
            if self._service is None:
                raise BrokerConnectionError("Azure queue broker is not connected (use 'async with' or connect())")
            client = self._clients[queue] = self._service.get_queue_client(native_queue_name(queue))
        return client

    def dead_letter_name(self, queue: str) -> str:
        """The platform's poison-queue convention: ``<queue>-poison`` (a valid Azure queue name)."""
        native = native_queue_name(queue)
        name = f"{native}{POISON_SUFFIX}"
        if len(name) > 63:
            raise ConfigurationError(
                f"Azure queue name {native!r} leaves no room for its poison queue {name!r} (63 characters at "
                f"most): use at most {63 - len(POISON_SUFFIX)} characters"
            )
        return name

    # -- queues ------------------------------------------------------------------------------------------------

    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        if fifo:
            raise NotSupported("Azure Storage Queues do not guarantee order: no FIFO queues (Capabilities.ordered)")
        if topics:
            raise NotSupported("the azure backend has no topic pub/sub (Capabilities.fanout is False)")
        if queue in self._declared:
            return
        client = self._client(queue)
        try:
            await client.create_queue()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise map_error(exc, f"declare {queue!r}", queue) from exc
        self._declared.add(queue)

    async def purge(self, queue: str) -> None:
        try:
            await self._client(queue).clear_messages()
        except AzureError as exc:
            raise map_error(exc, f"purge {queue!r}", queue) from exc

    async def depth(self, queue: str) -> int:
        """Azure's ``approximate_message_count``: it includes invisible (in-flight, delayed) messages."""
        try:
            properties = await self._client(queue).get_queue_properties()
        except AzureError as exc:
            raise map_error(exc, f"depth of {queue!r}", queue) from exc
        return int(properties.approximate_message_count or 0)

    async def queue_stats(self, queue: str) -> QueueStats:
        """The approximate message count only (in-flight and delayed messages included); the rest is ``None``.

        Azure Storage Queues say neither how many messages are invisible nor how many consumers poll.
        """
        return QueueStats(await self.depth(queue), None, None)

    async def delete_queue(self, queue: str) -> None:
        try:
            await self._client(queue).delete_queue()
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise map_error(exc, f"delete {queue!r}", queue) from exc
        self._declared.discard(queue)

    # -- publishing --------------------------------------------------------------------------------------------

    def encode(
        self,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        key: str | None = None,
    ) -> str:
        """The message text for one message, size-checked; what :meth:`publish` sends.

        Raises:
            MessageTooLarge: the body is over ``capabilities.max_message_bytes``, or the encoded text is over
                Azure's 65,536 bytes.
        """
        limit = self.capabilities.max_message_bytes
        if len(body) > limit:
            raise MessageTooLarge(len(body), limit, "azure")
        text = encode_frame(body, headers, message_id or new_id(), key)
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if size > AZURE_MAX_MESSAGE_TEXT:
            raise MessageTooLarge(size, AZURE_MAX_MESSAGE_TEXT, "Azure Storage Queues (message text after encoding)")
        return text

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
        check_delay(delay)
        text = self.encode(body, headers=headers, message_id=message_id, key=key)
        await self._send(queue, text, delay)
        self._wake(queue, after=whole_seconds(delay))

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Azure has no batch send: the messages go as concurrent sends (at most ``max_in_flight`` at once)."""
        for message in messages:
            check_delay(message.delay)
        texts = [
            (self.encode(m.body, headers=m.headers, message_id=m.message_id, key=m.key), m.delay) for m in messages
        ]
        results = await asyncio.gather(
            *(self._send(queue, text, delay) for text, delay in texts), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._wake(queue, after=0)

    async def _send(self, queue: str, text: str, delay: float | None) -> None:
        client = self._client(queue)
        assert self._send_slots is not None
        async with self._send_slots:
            try:
                await client.send_message(
                    text, visibility_timeout=whole_seconds(delay) or None, time_to_live=self.message_ttl
                )
            except HttpResponseError as exc:
                if exc.status_code == 413:
                    raise MessageTooLarge(
                        len(text.encode("utf-8")), AZURE_MAX_MESSAGE_TEXT, "Azure Storage Queues (server)"
                    ) from exc
                mapped = map_error(exc, f"publish to {queue!r}", queue)
                if type(mapped) is BrokerError:
                    mapped = PublishError(str(mapped))
                raise mapped from exc
            except AzureError as exc:
                raise map_error(exc, f"publish to {queue!r}", queue) from exc

    def _wake(self, queue: str, *, after: float) -> None:
        subscriptions = [s for s in self._subscriptions if s.queue == queue]
        if not subscriptions:
            return
        if after <= 0:
            for subscription in subscriptions:
                subscription.wake()
            return
        loop = asyncio.get_running_loop()
        for subscription in subscriptions:
            loop.call_later(after + 0.05, subscription.wake)

    # -- consuming ---------------------------------------------------------------------------------------------

    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        subscription = AzureQueueSubscription(self, queue, self._client(queue), prefetch)
        self._subscriptions.add(subscription)
        return subscription

    async def _receive(self, client: QueueClient, count: int) -> list[QueueMessage]:
        pager = client.receive_messages(
            messages_per_page=count, max_messages=count, visibility_timeout=self.visibility_timeout
        )
        async for page in pager.by_page():
            return [message async for message in page]
        return []

    def _delivery(self, sub: AzureQueueSubscription, message: QueueMessage) -> AzureQueueDelivery:
        content = message.content
        text = content if isinstance(content, str) else (content or b"").decode("utf-8", "replace")
        body, headers, message_id, key, error = decode_frame(text, foreign_encoding=self.foreign_encoding)
        if error is not None:
            headers = {**headers, "x-azure-frame-error": error}
        return AzureQueueDelivery(
            sub, message, body=body, headers=headers, message_id=message_id or str(message.id), key=key
        )

    def __repr__(self) -> str:
        return f"<AzureQueueBroker endpoint={redact_url(self._endpoint)!r} subscriptions={len(self._subscriptions)}>"

"""Azure Storage Queues backend on ``azure.storage.queue.aio``: at-least-once with a visibility heartbeat.

================  ==========================================================================================
Operation         Azure Storage Queues API
================  ==========================================================================================
receive           ``Get Messages`` in pages of up to 32, each with the visibility timeout; NEVER deleted on
                  receive: a consumer that dies leaves its messages to reappear when their visibility lapses
ack               ``Delete Message`` with the newest pop receipt
nack(requeue)     ``Update Message`` visibility to 0, or to ``ceil(delay)`` seconds
nack(no requeue)  ``Delete Message`` (the runtime has dead-lettered it first)
extend            ``Update Message`` visibility (the runtime's heartbeat); keeps the newest pop receipt
attempt           ``dequeue_count``
delay             ``Put Message`` with an initial visibility timeout (``publish(delay=...)``), at most 7 days
dead-letter       by the consumer runtime, to the platform's ``<queue>-poison`` convention
                  (:meth:`AzureQueueBroker.dead_letter_name`), reason in the ``x-death-reason`` header
visibility        ``visibility_timeout`` seconds (whole seconds, 1 to 7 days; default 30)
depth / purge     ``approximate_message_count`` (includes invisible messages) / ``Clear Messages``
size limit        65,536 bytes of message text AFTER encoding (measured before sending); bodies up to
                  ``max_message_bytes`` (44 KiB) always fit with up to ~5 KiB of id, key and headers
ordering, topics  none (``Capabilities.ordered`` and ``fanout`` are False)
queue names       a valid Azure name as it is; others lower-cased, other characters turned into hyphens
                  (:func:`native_queue_name`: ``orders.in`` is the Azure queue ``orders-in``)
================  ==========================================================================================

Message encoding. Azure messages carry text only, with no headers. taskstream sends one compact JSON object::

    {"tsq":1,"id":"<message id>","b":"<base64 of the body bytes>","h":{...headers...},"k":"<key>"}

The body is always base64, so any bytes survive (NUL, invalid UTF-8, binary frames); ``h`` and ``k`` are left
out when empty. The reserved headers ``content_type``, ``correlation_id`` and ``reply_to`` travel in ``h`` (Azure
has no native properties for them). A message that does not start with ``{"tsq":1,`` comes from a foreign
producer: its text, as UTF-8, is the body (``foreign_encoding=base64`` decodes it as base64 first, the way Azure
Functions writes messages), with no headers and Azure's message id. Base64 is decoded here, guarded: a broken
frame is still delivered (as its raw text, with an ``x-azure-frame-error`` header) so the runtime dead-letters it
with the reason instead of losing it.

URLs (query parameters and keyword options override each other, options win):

==========================================================  ====================================================
URL                                                         Meaning
==========================================================  ====================================================
``azurequeue://devstorage[:port]``                          Azurite's development account on 127.0.0.1:10001
                                                            (``?host=azurite`` for another host)
``azurequeue://``                                           the connection string from ``connection_string=``
                                                            or ``$AZURE_STORAGE_CONNECTION_STRING``
``azurequeue://?connection_string=<percent-encoded>``       an explicit connection string
                                                            (``UseDevelopmentStorage=true`` works)
``azurequeue://<account>.queue.core.windows.net``           an account URL; the credential is the
                                                            ``credential=`` option (account key, SAS token or an
                                                            azure-identity credential), else
                                                            ``$AZURE_STORAGE_KEY``, else
                                                            ``$AZURE_STORAGE_SAS_TOKEN``
``azurequeue://<account>:<key>@<host>:<port>[/<account>]``  explicit endpoint and account key (path-style for
                                                            emulators); http for loopback hosts, else https
==========================================================  ====================================================

Other parameters: ``visibility_timeout`` (s, default 30), ``poll_interval`` (longest sleep between polls of an
empty queue, default 1.0 s), ``message_ttl`` (s, default -1 = never expire), ``max_in_flight`` (concurrent
sends of one ``publish_batch``, default 32), ``foreign_encoding`` (``text`` or ``base64``), ``api_version``,
``secure`` (``true``/``false``). Keys, SAS tokens and connection strings never appear in reprs, logs or errors.

Polling. Azure has no long polling: an empty queue is polled after 0.05 s, then twice as long each time up to
``poll_interval``; any received message resets the delay. A publish or requeue through the same broker object
wakes its subscriptions on that queue at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient, QueueServiceClient

from taskstream.brokers.base import Broker, Capabilities, Delivery, OutgoingMessage, Subscription
from taskstream.errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MalformedMessage,
    MessageTooLarge,
    NotSupported,
    PublishError,
    QueueNotFound,
)
from taskstream.messages import new_id
from taskstream.settings import redact_url

__all__ = [
    "AZURE_MAX_MESSAGE_TEXT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DEVSTORE_ACCOUNT",
    "AzureQueueBroker",
    "AzureQueueSubscription",
    "azure_queue_name",
    "decode_frame",
    "encode_frame",
    "native_queue_name",
]

log = logging.getLogger("taskstream.brokers.azure")

T = TypeVar("T")

DEFAULT_VISIBILITY_TIMEOUT = 30
#: Azure's limit on one message's text, in bytes of UTF-8, after encoding.
AZURE_MAX_MESSAGE_TEXT = 65536
#: Largest body accepted: base64 makes it 60,076 characters, leaving ~5 KiB for the frame, id, key and headers
#: (a dead-letter reason is up to 4,000 characters).
DEFAULT_MAX_MESSAGE_BYTES = 44 * 1024
MAX_PAGE = 32
MAX_VISIBILITY = 7 * 24 * 3600
MIN_POLL_DELAY = 0.05
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_MAX_IN_FLIGHT = 32
POISON_SUFFIX = "-poison"
DEVSTORE_ACCOUNT = "devstoreaccount1"
# Azurite's published, well-known development key (not a secret; documented by Microsoft for the emulator).
_DEVSTORE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_DEVSTORE_PORT = 10001
_FRAME_PREFIX = '{"tsq":1,'
_QUEUE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_SECRET_PATTERNS = re.compile(r"(?i)(accountkey=|sig=|sharedaccesssignature=)[^;&\s]+")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# -- names ----------------------------------------------------------------------------------------------------


def azure_queue_name(name: str) -> str:
    """Turn any name into a valid Azure queue name that leaves room for the ``-poison`` suffix.

    Lowercases, replaces other characters by hyphens, collapses repeated hyphens, trims to 56 characters.

    Example:
        >>> azure_queue_name("Sensors.Readings_v2")
        'sensors-readings-v2'
    """
    cleaned = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cleaned = cleaned[: 63 - len(POISON_SUFFIX)].strip("-")
    while len(cleaned) < 3:
        cleaned = f"{cleaned}q" if cleaned else "qqq"
    return cleaned


def native_queue_name(name: str) -> str:
    """The Azure queue that stands for the taskstream queue ``name`` (what a plain Azure SDK client addresses).

    A valid Azure name is used as it is; any other is lower-cased and every run of other characters becomes one
    hyphen, the way the SQS backend maps dots, so the same App runs on every broker (``orders.in`` is the Azure
    queue ``orders-in``, its dead-letter queue ``orders-in-poison``). Nothing is cut: a name that is still not
    valid (3-63 characters) is refused.

    Example:
        >>> native_queue_name("Orders.In")
        'orders-in'

    Raises:
        ConfigurationError: the name does not map to a valid Azure queue name.
    """
    if _QUEUE_NAME.fullmatch(name):
        return name
    native = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not _QUEUE_NAME.fullmatch(native):
        raise ConfigurationError(
            f"invalid Azure queue name {name!r} (as {native!r}): Azure queue names are 3-63 lowercase letters, "
            "digits and single hyphens (taskstream lower-cases names and turns other characters into hyphens); "
            "taskstream.brokers.azure_queues.azure_queue_name() shortens a long name"
        )
    return native


# -- the message frame ----------------------------------------------------------------------------------------


def encode_frame(body: bytes, headers: Mapping[str, Any] | None, message_id: str, key: str | None) -> str:
    """The message text taskstream sends for one message (see the module docstring).

    Raises:
        MalformedMessage: a header value is not JSON-compatible.
    """
    doc: dict[str, Any] = {"tsq": 1, "id": message_id, "b": base64.b64encode(body).decode("ascii")}
    if headers:
        doc["h"] = dict(headers)
    if key is not None:
        doc["k"] = key
    try:
        text = orjson.dumps(doc).decode("utf-8")
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise MalformedMessage(f"message headers must be JSON-compatible with string keys: {exc}") from exc
    if "\ufffe" in text or "\uffff" in text:  # not allowed in XML, which carries the text
        text = text.replace("\ufffe", "\\ufffe").replace("\uffff", "\\uffff")
    return text


def decode_frame(
    text: str, *, foreign_encoding: str = "text"
) -> tuple[bytes, dict[str, Any], str | None, str | None, str | None]:
    """Split received message text into ``(body, headers, message_id, key, error)``.

    Never raises: text that cannot be decoded comes back as its own UTF-8 bytes with ``error`` saying why, so
    the consumer runtime can dead-letter it with the reason.
    """
    raw = text.encode("utf-8", "surrogatepass")
    if text.startswith(_FRAME_PREFIX):
        try:
            doc = orjson.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("b"), str):
                raise ValueError("no base64 body")
            body = base64.b64decode(doc["b"], validate=True)
        except (orjson.JSONDecodeError, ValueError, binascii.Error) as exc:
            return raw, {}, None, None, f"broken taskstream frame: {exc}"
        headers = doc.get("h")
        message_id = doc.get("id")
        key = doc.get("k")
        return (
            body,
            headers if isinstance(headers, dict) else {},
            message_id if isinstance(message_id, str) else None,
            key if isinstance(key, str) else None,
            None,
        )
    if foreign_encoding == "base64":
        try:
            return base64.b64decode(text, validate=True), {}, None, None, None
        except (binascii.Error, ValueError) as exc:
            return raw, {}, None, None, f"foreign message is not valid base64: {exc}"
    return raw, {}, None, None, None


# -- errors ---------------------------------------------------------------------------------------------------


def _error_code(exc: BaseException) -> str:
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    return str(code) if code else ""


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a driver error."""
    code = _error_code(exc)
    status = getattr(exc, "status_code", None)
    if code or status:
        return f"{code or type(exc).__name__} (HTTP {status})" if status else code
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    scrubbed = _SECRET_PATTERNS.sub(r"\1***", first_line)[:300]
    return f"{type(exc).__name__}: {scrubbed}"


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError | TimeoutError):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, HttpResponseError) and (status is None or status >= 500 or status == 429)


def _map_error(exc: BaseException, what: str, queue: str | None = None) -> BrokerError:
    detail = _describe(exc)
    if isinstance(exc, ResourceNotFoundError) and _error_code(exc) == "QueueNotFound":
        return QueueNotFound(f"{what}: Azure queue {queue!r} does not exist (declare it first)")
    if isinstance(exc, ClientAuthenticationError):
        return BrokerConnectionError(f"{what}: Azure refused the credential: {detail}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError | TimeoutError):
        return BrokerConnectionError(f"{what}: cannot reach Azure Storage: {detail}")
    return BrokerError(f"{what}: {detail}")


def _check_delay(delay: float | None) -> None:
    if delay is not None and delay > MAX_VISIBILITY:
        raise ConfigurationError(f"a delay of {delay} s is over Azure's limit of 7 days ({MAX_VISIBILITY} s)")


def _seconds(value: float | None) -> int:
    """Whole seconds for Azure visibility values, never shorter than asked, within Azure's 7 days."""
    if value is None or value <= 0:
        return 0
    return min(MAX_VISIBILITY, math.ceil(value))


# -- deliveries and subscriptions -----------------------------------------------------------------------------


class AzureQueueDelivery(Delivery):
    """A received Azure message with its Azure id and newest pop receipt.

    Every broker call on one delivery runs one at a time and is never abandoned half-way (a cancelled caller
    still lets the call finish), so the pop receipt held here is always the newest one.
    """

    __slots__ = ("_azure_id", "_lock", "_receipt", "_sub", "visible_until")

    def __init__(
        self,
        sub: AzureQueueSubscription,
        message: QueueMessage,
        *,
        body: bytes,
        headers: dict[str, Any],
        message_id: str,
        key: str | None,
    ) -> None:
        super().__init__(
            queue=sub.queue,
            body=body,
            headers=headers,
            message_id=message_id,
            attempt=int(message.dequeue_count or 1),
            key=key,
        )
        self._sub = sub
        self._azure_id: str = message.id
        self._receipt: str = message.pop_receipt or ""
        self._lock = asyncio.Lock()
        self.visible_until = time.monotonic() + sub.broker.visibility_timeout

    async def _serial(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self._lock:
            task = asyncio.ensure_future(call())
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    await asyncio.wait([task])  # keep the lock until the receipt is recorded
                raise

    async def _set_visibility(self, seconds: int) -> None:
        updated = await self._sub.client.update_message(self._azure_id, self._receipt, visibility_timeout=seconds)
        self._receipt = updated.pop_receipt or self._receipt
        self.visible_until = time.monotonic() + seconds

    async def _delete(self) -> None:
        await self._sub.client.delete_message(self._azure_id, self._receipt)

    def _lease_lost(self, exc: HttpResponseError, action: str) -> bool:
        code = _error_code(exc)
        if code in ("PopReceiptMismatch", "MessageNotFound"):
            log.warning(
                "%s of message %s on %r failed: %s (its visibility lapsed; it is delivered again)",
                action,
                self.message_id,
                self.queue,
                code,
            )
            return True
        return False

    async def _ack(self) -> None:
        try:
            await self._serial(self._delete)
        except HttpResponseError as exc:
            if not self._lease_lost(exc, "ack"):
                raise _map_error(exc, f"ack on {self.queue!r}", self.queue) from exc
        except AzureError as exc:
            raise _map_error(exc, f"ack on {self.queue!r}", self.queue) from exc
        finally:
            self._sub._released(self)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        seconds = _seconds(delay)
        try:
            if requeue:
                await self._serial(lambda: self._set_visibility(seconds))
                self._sub.broker._wake(self.queue, after=seconds)
            else:
                await self._serial(self._delete)
        except HttpResponseError as exc:
            if not self._lease_lost(exc, "nack"):
                raise _map_error(exc, f"nack on {self.queue!r}", self.queue) from exc
        except AzureError as exc:
            raise _map_error(exc, f"nack on {self.queue!r}", self.queue) from exc
        finally:
            self._sub._released(self)

    async def _extend(self, seconds: float) -> None:
        visibility = max(1, _seconds(seconds))
        try:
            await self._serial(lambda: self._set_visibility(visibility))
        except HttpResponseError as exc:
            if not self._lease_lost(exc, "extend"):
                raise _map_error(exc, f"extend on {self.queue!r}", self.queue) from exc
        except AzureError as exc:
            raise _map_error(exc, f"extend on {self.queue!r}", self.queue) from exc

    async def _return(self) -> None:
        """Give an unsettled message back now (visibility 0); later ack/nack calls are ignored."""
        if self.settled:
            return
        self.settled = True
        try:
            await self._serial(lambda: self._set_visibility(0))
        except Exception as exc:  # it comes back by itself when its visibility lapses
            log.debug("could not return message %s on %r: %s", self.message_id, self.queue, _describe(exc))


class AzureQueueSubscription(Subscription):
    """A consumer of one Azure queue: a background poller fills a buffer the iterator drains.

    The poller receives pages of up to ``min(32, prefetch - held)`` messages, so received-but-unsettled
    messages never exceed ``prefetch``. Everything received and not yet settled belongs to the subscription;
    :meth:`close` makes it visible again at once. Cancelling ``__anext__`` only cancels a wait: no message is
    ever in the middle of being handed over.

    Buffered messages are kept invisible (``Update Message``) while they wait; handed-out ones are the
    runtime's to extend (its heartbeat).

    Attributes:
        polls: receive calls made.
        empty_polls: receive calls that found no message.
        idle_delay: the current sleep between polls of an empty queue (seconds).
    """

    def __init__(self, broker: AzureQueueBroker, queue: str, client: QueueClient, prefetch: int) -> None:
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, got {prefetch}")
        self.broker = broker
        self.queue = queue
        self.client = client
        self.prefetch = prefetch
        self.polls = 0
        self.empty_polls = 0
        self.idle_delay = MIN_POLL_DELAY
        self._buffer: deque[AzureQueueDelivery] = deque()
        self._unsettled: set[AzureQueueDelivery] = set()
        self._closed = False
        self._error: BrokerError | None = None
        self._changed = asyncio.Event()  # for __anext__: buffer filled, slot freed, closed, failed
        self._wakeup = asyncio.Event()  # for the poller: slot freed (when full), work announced, closing
        self._full = False
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"azure-poll:{queue}")

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._buffer and len(self._unsettled) < self.prefetch:
                delivery = self._buffer.popleft()
                self._unsettled.add(delivery)
                return delivery
            if self._error is not None and not self._buffer:
                raise self._error
            self._changed.clear()
            await self._changed.wait()

    def _released(self, delivery: AzureQueueDelivery) -> None:
        if delivery in self._unsettled:
            self._unsettled.discard(delivery)
            self._changed.set()
            if self._full:  # the poller waits for room: let it poll now
                self._wakeup.set()

    @property
    def buffered(self) -> int:
        """Messages received from Azure and not yet handed out (kept invisible by this subscription)."""
        return len(self._buffer)

    def wake(self) -> None:
        """Poll now and restart the idle back-off (work was announced on this queue)."""
        self.idle_delay = MIN_POLL_DELAY
        self._wakeup.set()

    async def _sleep(self, seconds: float) -> None:
        # Not cleared here: a wake-up that came during the last receive must cut this sleep short.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()

    async def _poll(self) -> None:
        broker = self.broker
        failing_since: float | None = None
        last_report = 0.0
        while not self._closed:
            refresh_in = self._refresh_buffered()
            room = self.prefetch - len(self._unsettled) - len(self._buffer)
            if room <= 0:
                self._full = True
                self._wakeup.clear()
                await self._sleep(min(refresh_in, broker.visibility_timeout / 3))
                continue
            self._full = False
            self._wakeup.clear()  # wake-ups from here on are kept for the sleep that follows an empty poll
            try:
                messages = await broker._receive(self.client, min(MAX_PAGE, room))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    self._error = _map_error(exc, f"receive from {self.queue!r}", self.queue)
                    self._error.__cause__ = exc
                    self._changed.set()
                    return
                now = time.monotonic()
                if failing_since is None or now - last_report > 30:
                    log.warning("receive from %r failed, retrying: %s", self.queue, _describe(exc))
                    last_report = now
                failing_since = failing_since or now
                self.idle_delay = min(max(broker.poll_interval, 5.0), max(self.idle_delay * 2, 0.5))
                await self._sleep(min(refresh_in, self.idle_delay))
                continue
            if failing_since is not None:
                log.info("receive from %r works again", self.queue)
                failing_since = None
            self.polls += 1
            if messages:
                self._buffer.extend(broker._delivery(self, m) for m in messages)
                self._changed.set()
                self.idle_delay = MIN_POLL_DELAY
                continue
            self.empty_polls += 1
            delay = self.idle_delay
            self.idle_delay = min(broker.poll_interval, self.idle_delay * 2)
            await self._sleep(min(refresh_in, delay))

    def _refresh_buffered(self) -> float:
        """Keep buffered (received, not yet handed out) messages invisible while they wait.

        Returns:
            seconds until the next refresh is due (``inf`` with an empty buffer); the poller sleeps no longer.
        """
        if not self._buffer:
            return math.inf
        timeout = self.broker.visibility_timeout
        margin = timeout / 2
        now = time.monotonic()
        next_due = math.inf
        for delivery in self._buffer:
            if delivery.visible_until - margin <= now:
                delivery.visible_until = now + timeout  # one refresh at a time
                task = asyncio.ensure_future(delivery.extend(timeout))
                task.add_done_callback(_quiet)
            next_due = min(next_due, delivery.visible_until - margin - now)
        return max(0.05, next_due)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self._changed.set()
        if not self._poller.done():
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(self._poller)
            except TimeoutError:  # a hung receive: its messages come back when their visibility lapses
                self._poller.cancel()
                with contextlib.suppress(BaseException):
                    await self._poller
            except Exception:
                pass
        held = [*self._buffer, *self._unsettled]
        self._buffer.clear()
        self._unsettled.clear()
        if held:
            await asyncio.gather(*(d._return() for d in held))
        self.broker._subscriptions.discard(self)


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("refreshing a buffered message failed: %s", _describe(task.exception()))  # type: ignore[arg-type]


# -- the broker -----------------------------------------------------------------------------------------------


def _parse_connection_string(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for piece in text.strip().split(";"):
        if not piece.strip():
            continue
        name, sep, value = piece.partition("=")
        if not sep:
            raise ConfigurationError(
                "the Azure Storage connection string is malformed: expected 'Name=value' pairs separated by ';'"
            )
        parts[name.strip().lower()] = value.strip()
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return parts
    if "accountname" not in parts and "queueendpoint" not in parts:
        raise ConfigurationError(
            "the Azure Storage connection string has neither AccountName nor QueueEndpoint "
            "(or use 'UseDevelopmentStorage=true' for Azurite)"
        )
    if "accountkey" not in parts and "sharedaccesssignature" not in parts:
        raise ConfigurationError("the Azure Storage connection string has neither AccountKey nor SharedAccessSignature")
    return parts


def _endpoint_of(parts: Mapping[str, str]) -> str:
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return f"http://127.0.0.1:{_DEVSTORE_PORT}/{DEVSTORE_ACCOUNT}"
    if "queueendpoint" in parts:
        return parts["queueendpoint"].split("?", 1)[0].rstrip("/")
    protocol = parts.get("defaultendpointsprotocol", "https")
    suffix = parts.get("endpointsuffix", "core.windows.net")
    return f"{protocol}://{parts['accountname']}.queue.{suffix}"


def _query(url_query: str) -> dict[str, str]:
    # Plain unquote (not unquote_plus): account keys and SAS tokens contain '+' that must survive.
    params: dict[str, str] = {}
    for piece in url_query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            params[unquote(name)] = unquote(value)
    return params


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, got {value!r}")


class AzureQueueBroker(Broker):
    """Azure Storage Queues (and Azurite). See the module docstring for the mapping and the URL forms.

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
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        foreign_encoding: str = "text",
        api_version: str | None = None,
    ) -> None:
        if (connection_string is None) == (account_url is None):
            raise ConfigurationError("give the Azure queue broker either a connection string or an account URL")
        if connection_string is not None:
            self._endpoint = _endpoint_of(_parse_connection_string(connection_string))
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
            native_dead_letter=False,
            native_delay=True,
            visibility_timeout=float(self.visibility_timeout),
            max_batch=MAX_PAGE,
            max_delay=float(MAX_VISIBILITY),
        )
        self._service: QueueServiceClient | None = None
        self._clients: dict[str, QueueClient] = {}
        self._declared: set[str] = set()
        self._subscriptions: set[AzureQueueSubscription] = set()
        self._send_slots: asyncio.Semaphore | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AzureQueueBroker:
        """Build a broker from an ``azurequeue://`` URL (see the module docstring); ``options`` win over the query."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"bad Azure queue URL {redact_url(url)!r}: {exc}") from None
        if parts.scheme.lower() != "azurequeue":
            raise ConfigurationError(f"not an azurequeue:// URL: {redact_url(url)!r}")
        params: dict[str, Any] = _query(parts.query)
        params.update(options)
        host = parts.hostname or ""
        credential = params.pop("credential", None)
        connection_string = params.pop("connection_string", None)
        dev_host = params.pop("host", None)
        secure = params.pop("secure", None)
        try:
            tuning: dict[str, Any] = {}
            for name, kind in (
                ("visibility_timeout", float),
                ("poll_interval", float),
                ("message_ttl", int),
                ("max_message_bytes", int),
                ("max_in_flight", int),
            ):
                if name in params:
                    tuning[name] = kind(params.pop(name))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"bad parameter in Azure queue URL {redact_url(url)!r}: {exc}") from None
        for name in ("foreign_encoding", "api_version"):
            if name in params:
                tuning[name] = str(params.pop(name))
        if params:
            raise ConfigurationError(
                f"unknown Azure queue URL parameter(s) {sorted(params)} in {redact_url(url)!r}; known: "
                "visibility_timeout, poll_interval, message_ttl, max_message_bytes, max_in_flight, "
                "foreign_encoding, api_version, connection_string, credential, host, secure"
            )
        if connection_string:
            return cls(connection_string=str(connection_string), **tuning)
        if host.lower() == "devstorage":
            dev = dev_host or "127.0.0.1"
            endpoint = f"http://{dev}:{port or _DEVSTORE_PORT}/{DEVSTORE_ACCOUNT}"
            return cls(
                connection_string=(
                    f"DefaultEndpointsProtocol=http;AccountName={DEVSTORE_ACCOUNT};AccountKey={_DEVSTORE_KEY};"
                    f"QueueEndpoint={endpoint};"
                ),
                **tuning,
            )
        if not host:
            env = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
            if not env:
                raise ConfigurationError(
                    "azurequeue:// without a host needs a connection string: pass connection_string=... "
                    "or set AZURE_STORAGE_CONNECTION_STRING (or use azurequeue://devstorage for Azurite)"
                )
            return cls(connection_string=env, **tuning)
        use_https = _bool(secure, "secure") if secure is not None else host.lower() not in _LOOPBACK
        netloc = parts.netloc.rsplit("@", 1)[-1]
        account_url = f"{'https' if use_https else 'http'}://{netloc}{parts.path.rstrip('/')}"
        account = unquote(parts.username) if parts.username else None
        if credential is None and parts.password:
            credential = AzureNamedKeyCredential(account or host.split(".")[0], unquote(parts.password))
        if credential is None and os.environ.get("AZURE_STORAGE_KEY"):
            name = account or os.environ.get("AZURE_STORAGE_ACCOUNT") or host.split(".")[0]
            credential = AzureNamedKeyCredential(name, os.environ["AZURE_STORAGE_KEY"])
        if credential is None and os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
            credential = AzureSasCredential(os.environ["AZURE_STORAGE_SAS_TOKEN"].lstrip("?"))
        if isinstance(credential, str):  # a key, or a SAS token (starts with sv= / ?sv=)
            secret = credential.lstrip("?")
            if "sig=" in secret:
                credential = AzureSasCredential(secret)
            else:
                credential = AzureNamedKeyCredential(account or host.split(".")[0], secret)
        return cls(account_url=account_url, credential=credential, **tuning)

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
            raise _map_error(exc, f"connect to {self._endpoint!r}") from exc
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
            raise _map_error(exc, f"declare {queue!r}", queue) from exc
        self._declared.add(queue)

    async def purge(self, queue: str) -> None:
        try:
            await self._client(queue).clear_messages()
        except AzureError as exc:
            raise _map_error(exc, f"purge {queue!r}", queue) from exc

    async def depth(self, queue: str) -> int:
        """Azure's ``approximate_message_count``: it includes invisible (in-flight, delayed) messages."""
        try:
            properties = await self._client(queue).get_queue_properties()
        except AzureError as exc:
            raise _map_error(exc, f"depth of {queue!r}", queue) from exc
        return int(properties.approximate_message_count or 0)

    async def delete_queue(self, queue: str) -> None:
        try:
            await self._client(queue).delete_queue()
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise _map_error(exc, f"delete {queue!r}", queue) from exc
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
        _check_delay(delay)
        text = self.encode(body, headers=headers, message_id=message_id, key=key)
        await self._send(queue, text, delay)
        self._wake(queue, after=_seconds(delay))

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        """Azure has no batch send: the messages go as concurrent sends (at most ``max_in_flight`` at once)."""
        for message in messages:
            _check_delay(message.delay)
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
                    text, visibility_timeout=_seconds(delay) or None, time_to_live=self.message_ttl
                )
            except HttpResponseError as exc:
                if exc.status_code == 413:
                    raise MessageTooLarge(
                        len(text.encode("utf-8")), AZURE_MAX_MESSAGE_TEXT, "Azure Storage Queues (server)"
                    ) from exc
                mapped = _map_error(exc, f"publish to {queue!r}", queue)
                if type(mapped) is BrokerError:
                    mapped = PublishError(str(mapped))
                raise mapped from exc
            except AzureError as exc:
                raise _map_error(exc, f"publish to {queue!r}", queue) from exc

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

"""The claim-check: envelopes over a broker's size threshold travel as a reference to a stored blob.

What goes on the broker instead of the envelope (one small JSON object, always well under every limit)::

    {"ts_ref": 1, "id": "<envelope id>", "kind": "task", "store": "s3://bucket/prefix/",
     "key": "20250101/<id>-1a2b3c4d.tsb", "size": 6400123, "sha256": "<hex>", "format": "tsb1",
     "shared": false}

Life of a payload:

1. :meth:`ClaimCheck.offload` (the producer, when the encoded envelope is over the threshold): the envelope is
   encoded in the blob format (:mod:`taskstream.payloads.codec`), stored, and the reference is published.
2. :meth:`ClaimCheck.load` (the consumer, before the handler runs): fetch, check size and SHA-256, decode.
   A missing or corrupt blob raises :class:`PayloadMissing` / :class:`PayloadCorrupt` (the consumer
   dead-letters with the reason); a store that cannot be reached raises :class:`PayloadStoreError` (retried).
3. :meth:`ClaimCheck.release` (the consumer, after the final ack): delete the blob. A dead-lettered message
   keeps its reference, so its payload stays until the dead letter is consumed or expired. A reference
   published to a topic is ``shared`` by every bound queue and is left to :meth:`BlobStore.expire`.

The threshold is ``max_message_bytes - headroom`` of the broker (never below half the limit), or a smaller
explicit ``threshold`` (``TASKSTREAM_PAYLOAD_THRESHOLD``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import orjson

from taskstream.brokers.base import OutgoingMessage
from taskstream.errors import ConfigurationError, MalformedMessage, MessageError, MessageTooLarge
from taskstream.messages import Envelope, decode
from taskstream.payloads.base import BlobStore, PayloadCorrupt, PayloadError, blob_store_from_url, check_key
from taskstream.payloads.codec import decode_blob, encode_blob
from taskstream.payloads.local import LocalStore, default_directory
from taskstream.settings import Settings

__all__ = [
    "ClaimCheck",
    "DEFAULT_HEADROOM",
    "PayloadRef",
    "REF_MARK",
    "is_reference",
    "open_failure_reason",
]

log = logging.getLogger("taskstream.payloads")

#: bytes kept free below a broker's limit for headers and broker framing
DEFAULT_HEADROOM = 4096
#: every reference document starts with these bytes
REF_MARK = b'{"ts_ref":1,'
_FORMAT = "tsb1"
#: blob formats: the envelope re-encoded with raw buffers, or the message bytes exactly as encoded inline
_FORMATS = ("tsb1", "json")
_HASH_IN_THREAD = 1 << 20
_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]")


def is_reference(body: bytes) -> bool:
    """True when ``body`` is a payload reference rather than an envelope."""
    return body[: len(REF_MARK)] == REF_MARK


def open_failure_reason(exc: MessageError) -> str:
    """The dead-letter reason (``x-death-reason``) for a message :meth:`ClaimCheck.open` refused.

    Every reader of raw deliveries (the consumer runtime, stream stages and queue sources, services) words it
    this way: ``payload unavailable: ...`` for a missing, corrupt or unreachable-by-design payload,
    ``malformed message: ...`` for bytes that do not decode.
    """
    if isinstance(exc, PayloadError):
        return f"payload unavailable: {exc}"
    return f"malformed message: {exc}"


@dataclass(frozen=True, slots=True)
class PayloadRef:
    """A pointer to an offloaded envelope.

    Attributes:
        store: the store's location (no secrets).
        key: the blob's key in that store.
        size: the blob's length in bytes.
        sha256: hex SHA-256 of the blob.
        id: the envelope's id.
        kind: the envelope's kind.
        format: blob format: ``tsb1`` (the envelope with raw buffers) or ``json`` (the message bytes as
            they would have travelled inline, from :meth:`ClaimCheck.offload_outgoing`).
        shared: referenced by several messages (topic fan-out): never deleted on ack, only expired.
    """

    store: str
    key: str
    size: int
    sha256: str
    id: str
    kind: str
    format: str = _FORMAT
    shared: bool = False

    def to_bytes(self) -> bytes:
        """The reference document published in place of the envelope."""
        doc = {
            "id": self.id,
            "kind": self.kind,
            "store": self.store,
            "key": self.key,
            "size": self.size,
            "sha256": self.sha256,
            "format": self.format,
            "shared": self.shared,
        }
        return REF_MARK + orjson.dumps(doc)[1:]

    @classmethod
    def from_bytes(cls, data: bytes) -> PayloadRef:
        """Parse a reference document.

        Raises:
            MalformedMessage: not a reference, or one with missing or mistyped fields.
        """
        try:
            doc = orjson.loads(data)
            ref = cls(
                store=str(doc["store"]),
                key=str(doc["key"]),
                size=int(doc["size"]),
                sha256=str(doc["sha256"]),
                id=str(doc["id"]),
                kind=str(doc["kind"]),
                format=str(doc.get("format", _FORMAT)),
                shared=bool(doc.get("shared", False)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MalformedMessage(f"broken payload reference: {exc}") from exc
        if ref.format not in _FORMATS:
            raise MalformedMessage(f"payload reference has format {ref.format!r}; this version reads {_FORMATS}")
        return ref


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _digest(data: bytes) -> str:
    if len(data) >= _HASH_IN_THREAD:  # hashlib releases the GIL on large inputs
        return await asyncio.to_thread(_sha256, data)
    return _sha256(data)


class ClaimCheck:
    """Offloads large envelopes to a blob store and resolves references back.

    Args:
        store: where new payloads go; ``None`` disables offloading (large messages raise
            :class:`~taskstream.errors.MessageTooLarge` as before).
        threshold: offload encoded envelopes larger than this many bytes; ``None`` derives it from the
            broker's limit. An explicit value above the broker's limit is capped to it.
        headroom: bytes kept free below the broker's limit when ``threshold`` is derived.
        readers: further stores references may point at (read and release only).

    Example:
        >>> check = ClaimCheck(LocalStore("/tmp/taskstream-doc-payloads"), threshold=1000)
        >>> check.threshold_for(262144)
        1000
    """

    def __init__(
        self,
        store: BlobStore | None,
        *,
        threshold: int | None = None,
        headroom: int = DEFAULT_HEADROOM,
        readers: Iterable[BlobStore] = (),
    ) -> None:
        if threshold is not None and threshold < 1:
            raise ConfigurationError(f"payload threshold must be a positive number of bytes, got {threshold}")
        if headroom < 0:
            raise ConfigurationError(f"payload headroom cannot be negative, got {headroom}")
        self.store = store
        self.threshold = threshold
        self.headroom = headroom
        self._stores: dict[str, BlobStore] = {s.location: s for s in (*readers, *([store] if store else []))}

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> ClaimCheck:
        """From ``TASKSTREAM_PAYLOAD_STORE_URL`` (default: a local directory) and ``TASKSTREAM_PAYLOAD_THRESHOLD``."""
        settings = settings or Settings()
        url = settings.payload_store_url.get_secret_value() if settings.payload_store_url else None
        store = blob_store_from_url(url) if url is not None else LocalStore(default_directory())
        return cls(store, threshold=settings.payload_threshold)

    @classmethod
    def disabled(cls) -> ClaimCheck:
        """No offloading: every message travels inline or fails with ``MessageTooLarge``."""
        return cls(None)

    @property
    def stores(self) -> list[BlobStore]:
        """Every store this claim-check reads from."""
        return list(self._stores.values())

    def threshold_for(self, max_message_bytes: int) -> int:
        """The largest encoded envelope that travels inline on a broker taking ``max_message_bytes``."""
        derived = max(max_message_bytes // 2, max_message_bytes - self.headroom)
        if self.threshold is None:
            return derived
        return min(self.threshold, max_message_bytes)

    async def offload(self, envelope: Envelope, *, shared: bool = False) -> PayloadRef:
        """Store ``envelope`` and return the reference to publish instead.

        Raises:
            ConfigurationError: this claim-check has no store.
            PayloadStoreError: the store failed.
            TypeError: the envelope holds a value no taskstream encoding covers.
        """
        return await self._store_blob(encode_blob(envelope), envelope.id, envelope.kind, _FORMAT, shared)

    async def _store_blob(self, data: bytes, ident: str, kind: str, fmt: str, shared: bool) -> PayloadRef:
        if self.store is None:
            raise ConfigurationError("payload offloading is disabled (no payload store configured)")
        safe = _SAFE_ID.sub("", ident)[:64] or "msg"
        key = f"{time.strftime('%Y%m%d', time.gmtime())}/{safe}-{uuid.uuid4().hex[:12]}.tsb"
        digest = await _digest(data)
        await self.store.put(key, data)
        log.debug("offloaded %d bytes of message %s to %s", len(data), ident, self.store.location)
        return PayloadRef(
            store=self.store.location,
            key=key,
            size=len(data),
            sha256=digest,
            id=ident,
            kind=kind,
            format=fmt,
            shared=shared,
        )

    async def offload_outgoing(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        threshold: int,
        max_message_bytes: int,
        broker: str = "broker",
        shared: bool = False,
    ) -> list[OutgoingMessage]:
        """Replace every message whose encoded body is over ``threshold`` by a reference to its stored bytes.

        For code that encodes messages itself and publishes with ``Broker.publish_batch``; the bytes are stored
        as they are (``format="json"``) and :meth:`open` / the consumer runtime resolve them as usual.

        Raises:
            MessageTooLarge: a body is over ``max_message_bytes`` and offloading is disabled.
            PayloadStoreError: the store failed.
        """
        out: list[OutgoingMessage] = []
        for message in messages:
            size = len(message.body)
            if size <= threshold or self.store is None:
                if size > max_message_bytes:
                    raise MessageTooLarge(size, max_message_bytes, broker)
                out.append(message)
                continue
            kind = str(message.headers.get("ts_kind", "record"))
            ref = await self._store_blob(message.body, message.message_id or "msg", kind, "json", shared)
            out.append(replace(message, body=ref.to_bytes()))
        return out

    async def open(self, body: bytes, *, message_id: str | None = None) -> tuple[Envelope, PayloadRef | None]:
        """Decode message bytes read straight from a broker, resolving a reference when it is one.

        For code that reads deliveries itself instead of through :class:`~taskstream.consumer.Consumer`:
        after the delivery is acked for good, pass the reference to :meth:`release`.
        """
        if is_reference(body):
            ref = PayloadRef.from_bytes(body)
            return await self.load(ref), ref
        return decode(body, message_id=message_id), None

    def _store_for(self, ref: PayloadRef) -> BlobStore:
        store = self._stores.get(ref.store)
        if store is not None:
            return store
        if ref.store.startswith("file://"):
            host = ref.store[len("file://") :].split("/", 1)[0]
            if host != socket.gethostname():
                raise PayloadError(
                    f"payload {ref.key!r} is in a local directory on host {host!r}, out of reach from "
                    f"{socket.gethostname()!r}: producers and consumers on several hosts need a shared store "
                    "(TASKSTREAM_PAYLOAD_STORE_URL=s3://... or azureblob://...)"
                )
        known = ", ".join(sorted(self._stores)) or "none"
        raise PayloadError(
            f"payload {ref.key!r} is in store {ref.store!r}, which this consumer is not configured for "
            f"(its stores: {known}); set TASKSTREAM_PAYLOAD_STORE_URL to the producer's store"
        )

    async def load(self, ref: PayloadRef) -> Envelope:
        """Fetch, verify and decode the envelope ``ref`` points at.

        Raises:
            PayloadError: the store is not one this claim-check knows.
            PayloadMissing: the blob is gone.
            PayloadCorrupt: size or checksum mismatch.
            MalformedMessage: the blob's bytes do not decode.
            PayloadStoreError: the store failed (transient).
        """
        data = await self.fetch(ref)
        if len(data) >= _HASH_IN_THREAD:
            return await asyncio.to_thread(decode_blob, data, message_id=ref.id)
        return decode_blob(data, message_id=ref.id)

    async def fetch(self, ref: PayloadRef) -> bytes:
        """The verified blob bytes ``ref`` points at (for ``format="json"``: the message bytes as encoded).

        Raises:
            PayloadError: the store is not one this claim-check knows.
            PayloadMissing: the blob is gone.
            PayloadCorrupt: size or checksum mismatch.
            PayloadStoreError: the store failed (transient).
        """
        store = self._store_for(ref)
        data = await store.get(check_key(ref.key))
        if len(data) != ref.size:
            raise PayloadCorrupt(
                f"payload {ref.key!r} in {ref.store} is {len(data)} bytes, its reference says {ref.size}"
            )
        digest = await _digest(data)
        if digest != ref.sha256:
            raise PayloadCorrupt(
                f"payload {ref.key!r} in {ref.store} fails its checksum (sha256 {digest[:16]}..., "
                f"reference says {ref.sha256[:16]}...)"
            )
        return data

    async def release(self, ref: PayloadRef, *, force: bool = False) -> bool:
        """Delete the blob after its message was acked for the last time (not for ``shared`` references).

        Failures are logged, not raised: :meth:`BlobStore.expire` removes what is left.

        Args:
            ref: the reference.
            force: delete a ``shared`` blob too (the producer, when the broker refused the message).

        Returns:
            True when the blob was deleted.
        """
        if ref.shared and not force:
            return False
        try:
            await self._store_for(ref).delete(check_key(ref.key))
        except Exception as exc:
            log.warning("could not delete payload %s in %s: %s (expiry will remove it)", ref.key, ref.store, exc)
            return False
        return True

    async def decode(self, body: bytes, *, message_id: str | None = None) -> Envelope:
        """Decode message bytes read straight from a broker, resolving a reference when it is one.

        For code that reads deliveries itself instead of through :class:`~taskstream.consumer.Consumer`.
        """
        if is_reference(body):
            return await self.load(PayloadRef.from_bytes(body))
        return decode(body, message_id=message_id)

    def __repr__(self) -> str:
        where = self.store.location if self.store else "disabled"
        return f"<ClaimCheck {where} threshold={self.threshold}>"

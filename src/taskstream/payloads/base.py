"""The blob store protocol, its errors, and ``blob_store_from_url``.

A blob store keeps whole payloads under string keys. Three backends:

======================================================================  ==================================
URL                                                                     Backend
======================================================================  ==================================
``file:///abs/dir``                                                     :class:`LocalStore` (one host)
``s3://bucket[/prefix]?endpoint_url=..&region=..&create=1``              :class:`S3Store` (aiobotocore)
``azureblob://container[/prefix]?connection_string=..&create=1``         :class:`AzureBlobStore`
``none``                                                                no store: large messages fail
======================================================================  ==================================

Every store has a ``location``: its URL without the query (no secrets) and, for a local directory, with the
host name (``file://host/dir``), so a reference made on one host is recognised as unreachable on another.
References carry the location; a consumer only reads from stores it was configured with, never from a
location named on the wire.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from taskstream.errors import ConfigurationError, MessageError, MissingExtraError, TaskstreamError

__all__ = [
    "BlobInfo",
    "BlobStore",
    "PayloadCorrupt",
    "PayloadError",
    "PayloadMissing",
    "PayloadStoreError",
    "blob_store_from_url",
    "check_key",
    "redact_store_url",
]

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,511}$")


class PayloadError(MessageError):
    """A message's payload reference cannot be resolved; the consumer dead-letters it with this reason."""


class PayloadMissing(PayloadError):
    """The referenced blob is not in the store (deleted, expired, or never written)."""


class PayloadCorrupt(PayloadError):
    """The blob's size or SHA-256 does not match its reference, or its bytes do not decode."""


class PayloadStoreError(TaskstreamError):
    """The store could not be reached or refused an operation (transient: the consumer retries).

    The driver's exception is chained as ``__cause__``; messages never include credentials.
    """


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One stored blob, as listed by :meth:`BlobStore.list`.

    Attributes:
        key: the key under the store's prefix (what references carry).
        size: bytes.
        modified: last-modified time, seconds since the epoch.
    """

    key: str
    size: int
    modified: float


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe blob key (letters, digits, ``._/-``, no ``..``), else raise.

    Raises:
        PayloadCorrupt: the key could escape the store's prefix or is not a key taskstream makes.
    """
    if not _KEY.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
        raise PayloadCorrupt(f"refusing blob key {key[:80]!r}: not a key taskstream makes")
    return key


class BlobStore(abc.ABC):
    """Where payloads too large for a broker go. Every method is safe to call from any event loop.

    Implementations open a client per operation (or hold none), so a store object can be shared by
    producers and consumers and needs no closing.
    """

    #: short backend name for messages and logs
    name: str = "blob"

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where this store is, without secrets; references carry it."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (overwrites). Returns when it is durably stored."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """The bytes under ``key``.

        Raises:
            PayloadMissing: no blob under ``key``.
            PayloadStoreError: the store failed.
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def list(self) -> AsyncIterator[BlobInfo]:
        """Every blob under this store's prefix."""

    async def expire(self, older_than: float, *, now: float | None = None) -> int:
        """Delete leftover payload blobs (``*.tsb``) last modified more than ``older_than`` seconds ago.

        Leftovers are payloads of messages that were never acked for good: dead-lettered and then purged,
        consumed by a foreign client, or published to a topic (shared by every bound queue).

        Returns:
            how many blobs were deleted.
        """
        import time

        cutoff = (time.time() if now is None else now) - older_than
        stale = [info.key async for info in self.list() if info.key.endswith(".tsb") and info.modified < cutoff]
        for key in stale:
            await self.delete(key)
        return len(stale)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location}>"


def redact_store_url(url: str) -> str:
    """``url`` without its query string (where connection strings and keys live).

    Example:
        >>> redact_store_url("azureblob://c?connection_string=AccountKey%3Dabc")
        'azureblob://c?***'
    """
    head, sep, _ = url.partition("?")
    return f"{head}?***" if sep else head


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def _flag(value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def blob_store_from_url(url: str, **options: Any) -> BlobStore | None:
    """Build the store for ``url`` (see the module table); ``none``/``off``/``""`` gives ``None``.

    Example:
        >>> blob_store_from_url("file:///tmp/payloads").location.endswith("/tmp/payloads")
        True

    Raises:
        ConfigurationError: unknown scheme or a bad URL; the message shows the URL without secrets.
        MissingExtraError: the backend's client library is not installed.
    """
    text = url.strip()
    if text.lower() in ("", "none", "off", "disabled"):
        return None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    query = {**_query(text), **{k: str(v) for k, v in options.items()}}
    if scheme == "file":
        from taskstream.payloads.local import LocalStore

        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(
                f"local payload store URL {redact_store_url(url)!r} names host {parts.netloc!r}; "
                "use file:///absolute/path (a local directory is reachable from this host only)"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ConfigurationError(f"local payload store needs an absolute path: {redact_store_url(url)!r}")
        return LocalStore(path)
    if scheme == "s3":
        try:
            import aiobotocore  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("S3 payload store", "s3", "aiobotocore") from exc
        from taskstream.payloads.s3 import S3Store

        if not parts.netloc:
            raise ConfigurationError(
                f"S3 payload store URL needs a bucket: s3://bucket/prefix, got {redact_store_url(url)!r}"
            )
        return S3Store(
            parts.netloc,
            unquote(parts.path).lstrip("/"),
            endpoint_url=query.get("endpoint_url") or None,
            region=query.get("region") or query.get("region_name") or None,
            aws_access_key_id=query.get("aws_access_key_id") or None,
            aws_secret_access_key=query.get("aws_secret_access_key") or None,
            create=_flag(query.get("create")),
        )
    if scheme == "azureblob":
        try:
            import azure.storage.blob.aio  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("Azure Blob payload store", "azure", "azure-storage-blob") from exc
        from taskstream.payloads.azure_blob import AzureBlobStore

        if not parts.netloc:
            raise ConfigurationError(
                f"Azure Blob payload store URL needs a container: azureblob://container/prefix, "
                f"got {redact_store_url(url)!r}"
            )
        return AzureBlobStore(
            parts.netloc,
            unquote(parts.path).lstrip("/"),
            connection_string=query.get("connection_string") or None,
            create=_flag(query.get("create")),
        )
    raise ConfigurationError(
        f"unknown payload store URL scheme {scheme!r} in {redact_store_url(url)!r} "
        "(known: file://, s3://, azureblob://, none)"
    )

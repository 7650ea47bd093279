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
from typing import Any, ClassVar, Self
from urllib.parse import unquote, urlsplit

from taskstream.errors import ConfigurationError, MessageError, TaskstreamError
from taskstream.schemes import Backend, load_backend
from taskstream.urloptions import URLOptions

__all__ = [
    "BlobInfo",
    "BlobStore",
    "PayloadCorrupt",
    "PayloadError",
    "PayloadMissing",
    "PayloadStoreError",
    "StoreURL",
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
    #: the URL options :meth:`from_url` reads; any other is refused by name
    OPTIONS: ClassVar[URLOptions] = URLOptions("payload store", [])

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

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: StoreURL) -> Self:
        """Build the store from its URL (:func:`blob_store_from_url` picks the class by scheme).

        Raises:
            ConfigurationError: the URL lacks what this store needs; the message shows it without secrets.
        """

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


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A store URL taken apart for a backend's ``from_url``.

    Attributes:
        url: the URL as given (error messages show :attr:`redacted`).
        scheme: the scheme, lowercase.
        netloc: the part after ``scheme://`` up to the path (bucket, container or host).
        path: the path, percent-decoded.
        options: the options given (query parameters overridden by the caller's), converted by their kinds.
    """

    url: str
    scheme: str
    netloc: str
    path: str
    options: dict[str, Any]

    @classmethod
    def parse(cls, url: str, declared: URLOptions, **options: Any) -> StoreURL:
        """Split ``url``; its query parameters, overridden by ``options``, are parsed against ``declared``.

        Raises:
            ConfigurationError: an unknown option (named, with a "did you mean" and the redacted URL) or a value
                its kind does not accept.
        """
        parts = urlsplit(url.strip())
        values = declared.parse(parts.query, options, url=url)
        return cls(url, parts.scheme.lower(), parts.netloc, unquote(parts.path), values)

    @property
    def redacted(self) -> str:
        """The URL without its query (where keys live), for messages."""
        return redact_store_url(self.url)

    def place(self, label: str, what: str) -> tuple[str, str]:
        """``(netloc, prefix)`` of a ``scheme://WHAT[/prefix]`` URL (``what``: bucket, container).

        Raises:
            ConfigurationError: the URL names no ``what``; ``label`` names the store in the message.
        """
        if not self.netloc:
            raise ConfigurationError(
                f"{label} URL needs a {what}: {self.scheme}://{what}/prefix, got {self.redacted!r}"
            )
        return self.netloc, self.path.lstrip("/")

    def get(self, *names: str) -> str | None:
        """The first of ``names`` given a non-empty value, as text, else ``None``."""
        return next((str(value) for name in names if (value := self.options.get(name))), None)


#: URL scheme -> the store class (lazily imported) and the extra its client library comes with.
_BACKENDS: dict[str, Backend] = {
    "file": Backend("taskstream.payloads.local:LocalStore", "local payload store"),
    "s3": Backend("taskstream.payloads.s3:S3Store", "S3 payload store", "s3", "aiobotocore", "aiobotocore"),
    "azureblob": Backend(
        "taskstream.payloads.azure_blob:AzureBlobStore",
        "Azure Blob payload store",
        "azure",
        "azure.storage.blob.aio",
        "azure-storage-blob",
    ),
}
_OFF = ("", "none", "off", "disabled")


def blob_store_from_url(url: str, **options: Any) -> BlobStore | None:
    """Build the store for ``url`` (see the module table); ``none``/``off``/``""`` gives ``None``.

    ``options`` override the URL's query parameters; an option the store does not read is refused.

    Example:
        >>> blob_store_from_url("file:///tmp/payloads").location.endswith("/tmp/payloads")
        True

    Raises:
        ConfigurationError: unknown scheme or option (with a "did you mean") or a bad URL; the message shows the
            URL without secrets.
        MissingExtraError: the backend's client library is not installed; the message names the ``pip install``.
    """
    text = url.strip()
    if text.lower() in _OFF:
        return None
    cls: type[BlobStore] = load_backend(_BACKENDS, text, what="payload store", base=BlobStore)
    return cls.from_url(StoreURL.parse(url, cls.OPTIONS, **options))

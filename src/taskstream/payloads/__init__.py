"""Large payloads by reference (claim-check), for every broker.

A message whose encoded envelope is over its broker's threshold (``Capabilities.max_message_bytes`` minus
headroom, or ``TASKSTREAM_PAYLOAD_THRESHOLD``) is stored in a blob store and travels as a small reference
(store, key, size, SHA-256). :class:`~taskstream.producer.Producer` offloads, :class:`~taskstream.consumer.Consumer`
resolves the reference before the handler runs and deletes the blob after the final ack: handlers and callers
write nothing special. Task arguments, task results and stream records all go through those two classes.

Stores (``TASKSTREAM_PAYLOAD_STORE_URL``):

======================================================================  ==================================
URL                                                                     Store
======================================================================  ==================================
unset                                                                   local directory
                                                                        ``~/.cache/taskstream/payloads``
``file:///abs/dir``                                                     :class:`LocalStore` (one host)
``s3://bucket[/prefix]?endpoint_url=..&region=..&create=1``              :class:`S3Store`
``azureblob://container[/prefix]?connection_string=..&create=1``         :class:`AzureBlobStore`
``none``                                                                offloading off
======================================================================  ==================================

Failure handling: a missing blob (:class:`PayloadMissing`) or one whose size or checksum does not match
(:class:`PayloadCorrupt`) dead-letters the message with the reason; a store that cannot be reached
(:class:`PayloadStoreError`) is retried like a failing handler. Dead-lettered messages keep their blob.
Leftovers (purged dead letters, topic fan-out, crashed publishers) go with :meth:`BlobStore.expire`
(``taskstream payloads expire``).

Example:
    >>> from taskstream.payloads import ClaimCheck, LocalStore
    >>> check = ClaimCheck(LocalStore("/tmp/taskstream-doc-payloads"))
    >>> check.threshold_for(65536)
    61440
"""

from taskstream.payloads.base import (
    BlobInfo,
    BlobStore,
    PayloadCorrupt,
    PayloadError,
    PayloadMissing,
    PayloadStoreError,
    blob_store_from_url,
    redact_store_url,
)
from taskstream.payloads.claimcheck import DEFAULT_HEADROOM, ClaimCheck, PayloadRef, is_reference, open_failure_reason
from taskstream.payloads.codec import decode_blob, encode_blob
from taskstream.payloads.local import LocalStore, default_directory

__all__ = [
    "AzureBlobStore",
    "BlobInfo",
    "BlobStore",
    "ClaimCheck",
    "DEFAULT_HEADROOM",
    "LocalStore",
    "PayloadCorrupt",
    "PayloadError",
    "PayloadMissing",
    "PayloadRef",
    "PayloadStoreError",
    "S3Store",
    "blob_store_from_url",
    "decode_blob",
    "default_directory",
    "encode_blob",
    "is_reference",
    "open_failure_reason",
    "redact_store_url",
]


def __getattr__(name: str) -> object:
    # The cloud stores import their client libraries lazily (optional extras).
    if name == "S3Store":
        from taskstream.payloads.s3 import S3Store

        return S3Store
    if name == "AzureBlobStore":
        from taskstream.payloads.azure_blob import AzureBlobStore

        return AzureBlobStore
    raise AttributeError(f"module 'taskstream.payloads' has no attribute {name!r}")

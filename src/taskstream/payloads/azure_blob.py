"""A blob store on Azure Blob Storage (or Azurite) through ``azure-storage-blob``'s aio client.

URL: ``azureblob://container[/prefix]?connection_string=<url-encoded>&create=1``

==========================  ===================================================================
Query parameter             Meaning
==========================  ===================================================================
``connection_string``       URL-encoded storage connection string (``UseDevelopmentStorage%3Dtrue``
                            for Azurite); ``AZURE_STORAGE_CONNECTION_STRING`` when absent.
                            Never logged: locations drop the query
``create``                  ``1`` creates the container on first use (off by default)
==========================  ===================================================================

Operations map to ``upload_blob(overwrite=True)`` (above 1 MiB in 1 MiB blocks, 4 in parallel),
``download_blob``, ``delete_blob`` and ``list_blobs``. A client is opened per operation, so the store belongs to
no event loop and needs no closing. The location references carry is ``azureblob://<account>/<container>/<prefix>``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Self

from taskstream.errors import ConfigurationError
from taskstream.payloads.base import BlobInfo, BlobStore, PayloadMissing, PayloadStoreError, StoreURL, check_key
from taskstream.urloptions import Option, URLOptions

__all__ = ["AzureBlobStore", "account_name"]

DEV_ACCOUNT = "devstoreaccount1"
# Larger payloads go up as 1 MiB blocks, four at a time, then one commit: aiohttp warns that a single body
# over 1 MiB blocks the event loop, and blocks in parallel are faster on a real account anyway.
_BLOCK = 1024 * 1024


def account_name(connection_string: str) -> str:
    """The account a connection string points at (``devstoreaccount1`` for ``UseDevelopmentStorage=true``).

    Raises:
        ConfigurationError: the string names no account.
    """
    fields: dict[str, str] = {}
    for part in connection_string.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            fields[name.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return DEV_ACCOUNT
    if fields.get("accountname"):
        return fields["accountname"]
    endpoint = fields.get("blobendpoint", "")
    if endpoint:
        host_and_path = endpoint.split("://", 1)[-1].rstrip("/")
        host, _, path = host_and_path.partition("/")
        return path or host.split(".", 1)[0]
    raise ConfigurationError("the Azure storage connection string names no account (AccountName=...)")


class AzureBlobStore(BlobStore):
    """Payload blobs under ``container/prefix`` of one storage account.

    Args:
        container: container name (3-63 lowercase letters, digits, dashes).
        prefix: blob name prefix (a trailing ``/`` is added when missing).
        connection_string: the account's connection string; ``AZURE_STORAGE_CONNECTION_STRING`` when None.
        create: create the container on first use when it does not exist.
    """

    name = "azureblob"
    OPTIONS: ClassVar[URLOptions] = URLOptions(
        "Azure Blob payload store",
        [
            Option("connection_string", "str", None, "the account's connection string, URL-encoded", secret=True),
            Option("create", "bool", False, "create the container on first use"),
        ],
    )

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        connection_string: str | None = None,
        create: bool = False,
    ) -> None:
        conn = connection_string or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if not conn:
            raise ConfigurationError(
                "the Azure Blob payload store needs a connection string: add ?connection_string=<url-encoded> "
                "to the store URL or set AZURE_STORAGE_CONNECTION_STRING"
            )
        self._connection_string = conn
        self.container = container
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.account = account_name(conn)
        self.create = create
        self._container_ready = not create
        self._location = f"azureblob://{self.account}/{container}/{self.prefix}"

    @classmethod
    def from_url(cls, url: StoreURL) -> Self:
        """``azureblob://container[/prefix]`` with the query parameters of the module table."""
        container, prefix = url.place("Azure Blob payload store", "container")
        create = bool(url.options.get("create", False))
        return cls(container, prefix, connection_string=url.get("connection_string"), create=create)

    @property
    def location(self) -> str:
        return self._location

    @asynccontextmanager
    async def _container(self) -> AsyncIterator[Any]:
        from azure.core.exceptions import AzureError
        from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

        # The SDK's default retry waits 15 s and more between attempts; the consumer retries with its own
        # backoff anyway, so a store call gives up after a few seconds.
        retry = ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=2, random_jitter_range=1)
        try:
            async with BlobServiceClient.from_connection_string(
                self._connection_string,
                connection_timeout=10,
                read_timeout=120,
                retry_policy=retry,
                max_single_put_size=_BLOCK,
                max_block_size=_BLOCK,
            ) as service:
                container = service.get_container_client(self.container)
                if not self._container_ready:
                    await self._ensure_container(container)
                yield container
        except (PayloadMissing, PayloadStoreError):
            raise
        except AzureError as exc:
            message = getattr(exc, "reason", None) or type(exc).__name__
            code = getattr(exc, "error_code", None)
            detail = f"{message} ({code})" if code else str(message)
            raise PayloadStoreError(f"Azure Blob payload store {self.location}: {detail}") from exc

    async def _ensure_container(self, container: Any) -> None:
        from azure.core.exceptions import ResourceExistsError

        try:
            await container.create_container()
        except ResourceExistsError:
            pass
        self._container_ready = True

    async def put(self, key: str, data: bytes) -> None:
        async with self._container() as container:
            await container.upload_blob(self.prefix + check_key(key), data, overwrite=True, max_concurrency=4)

    async def get(self, key: str) -> bytes:
        from azure.core.exceptions import ResourceNotFoundError

        async with self._container() as container:
            try:
                downloader = await container.download_blob(self.prefix + check_key(key))
                data: bytes = await downloader.readall()
            except ResourceNotFoundError:
                raise PayloadMissing(f"payload {key!r} is not in {self.location}") from None
            return data

    async def delete(self, key: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        async with self._container() as container:
            try:
                await container.delete_blob(self.prefix + check_key(key))
            except ResourceNotFoundError:
                pass

    async def list(self) -> AsyncIterator[BlobInfo]:
        from azure.core.exceptions import ResourceNotFoundError

        async with self._container() as container:
            try:
                async for blob in container.list_blobs(name_starts_with=self.prefix or None):
                    yield BlobInfo(blob.name[len(self.prefix) :], int(blob.size), blob.last_modified.timestamp())
            except ResourceNotFoundError:
                return

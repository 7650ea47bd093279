"""A blob store on S3 (or anything that speaks its API: moto, MinIO, LocalStack) through aiobotocore.

URL: ``s3://bucket[/prefix]?endpoint_url=http://127.0.0.1:9324&region=us-east-1&create=1``

==========================  ===================================================================
Query parameter             Meaning
==========================  ===================================================================
``endpoint_url``            a non-AWS endpoint (moto, MinIO, LocalStack); AWS when absent
``region``                  region name; botocore's own default chain when absent
``aws_access_key_id``,      explicit credentials; otherwise botocore's chain (environment,
``aws_secret_access_key``   ``~/.aws``, instance role). Never logged: locations drop the query
``create``                  ``1`` creates the bucket on first use (off by default)
==========================  ===================================================================

Operations map to ``put_object``, ``get_object``, ``delete_object`` and ``list_objects_v2``. A client is
opened per operation (a few milliseconds once botocore's models are loaded), so the store belongs to no event
loop and needs no closing. For expiry at scale, an S3 lifecycle rule on the prefix does the same job as
:meth:`~taskstream.payloads.base.BlobStore.expire` without listing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Self

from taskstream.payloads.base import BlobInfo, BlobStore, PayloadMissing, PayloadStoreError, StoreURL, check_key
from taskstream.urloptions import Option, URLOptions

__all__ = ["S3Store"]

_MISSING = {"NoSuchKey", "404", "NotFound"}


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3Store(BlobStore):
    """Payload blobs as objects under ``s3://bucket/prefix``.

    Args:
        bucket: bucket name.
        prefix: key prefix (a trailing ``/`` is added when missing).
        endpoint_url: non-AWS endpoint, e.g. moto's server.
        region: region name.
        aws_access_key_id: explicit access key (else botocore's chain).
        aws_secret_access_key: explicit secret key.
        create: create the bucket on first use when it does not exist.
    """

    name = "s3"
    OPTIONS: ClassVar[URLOptions] = URLOptions(
        "S3 payload store",
        [
            Option("endpoint_url", "str", None, "a non-AWS endpoint (moto, MinIO, LocalStack)"),
            Option("region", "str", None, "region name"),
            Option("region_name", "str", None, "the same as region"),
            Option("aws_access_key_id", "str", None, "explicit access key", secret=True),
            Option("aws_secret_access_key", "str", None, "explicit secret key", secret=True),
            Option("create", "bool", False, "create the bucket on first use"),
        ],
    )

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        create: bool = False,
    ) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.create = create
        self._session = get_session()
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "config": AioConfig(connect_timeout=10, read_timeout=120, retries={"max_attempts": 3}),
        }
        self._bucket_ready = not create
        self._location = f"s3://{bucket}/{self.prefix}"

    @classmethod
    def from_url(cls, url: StoreURL) -> Self:
        """``s3://bucket[/prefix]`` with the query parameters of the module table."""
        bucket, prefix = url.place("S3 payload store", "bucket")
        return cls(
            bucket,
            prefix,
            endpoint_url=url.get("endpoint_url"),
            region=url.get("region", "region_name"),
            aws_access_key_id=url.get("aws_access_key_id"),
            aws_secret_access_key=url.get("aws_secret_access_key"),
            create=bool(url.options.get("create", False)),
        )

    @property
    def location(self) -> str:
        return self._location

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[Any]:
        try:
            async with self._session.create_client("s3", **self._client_args) as client:
                if not self._bucket_ready:
                    await self._ensure_bucket(client)
                yield client
        except (PayloadMissing, PayloadStoreError):
            raise
        except Exception as exc:
            if type(exc).__module__.startswith(("botocore", "aiobotocore", "aiohttp")):
                raise PayloadStoreError(f"S3 payload store {self.location}: {type(exc).__name__}: {exc}") from exc
            raise

    async def _ensure_bucket(self, client: Any) -> None:
        try:
            await client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            try:
                await client.create_bucket(Bucket=self.bucket)
            except Exception as create_exc:
                if _code(create_exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_ready = True

    async def put(self, key: str, data: bytes) -> None:
        async with self._client() as client:
            await client.put_object(Bucket=self.bucket, Key=self.prefix + check_key(key), Body=data)

    async def get(self, key: str) -> bytes:
        async with self._client() as client:
            try:
                response = await client.get_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
            except Exception as exc:
                if _code(exc) in _MISSING:
                    raise PayloadMissing(f"payload {key!r} is not in {self.location}") from None
                raise
            async with response["Body"] as stream:
                data: bytes = await stream.read()
            return data

    async def delete(self, key: str) -> None:
        async with self._client() as client:
            await client.delete_object(Bucket=self.bucket, Key=self.prefix + check_key(key))

    async def list(self) -> AsyncIterator[BlobInfo]:
        async with self._client() as client:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    yield BlobInfo(item["Key"][len(self.prefix) :], int(item["Size"]), item["LastModified"].timestamp())

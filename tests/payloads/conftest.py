"""Fixtures of the payload tests: one store per backend on the real services, unique prefixes per test."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from taskstream.payloads import BlobStore, LocalStore, blob_store_from_url

MOTO_ENDPOINT = "http://127.0.0.1:9324"
AZURITE_CONNECTION = "UseDevelopmentStorage=true"
BUCKET = "taskstream-tests"
CONTAINER = "taskstream-tests"


def require(port: int, what: str, script: str) -> None:
    """Fail (not skip) with the command that starts the service when it does not answer."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        pytest.fail(f"{what} does not answer on 127.0.0.1:{port}; start it with: bash scripts/services/{script}")


def s3_url(prefix: str) -> str:
    return (
        f"s3://{BUCKET}/{prefix}?endpoint_url={MOTO_ENDPOINT}&region=us-east-1"
        "&aws_access_key_id=testing&aws_secret_access_key=testing&create=1"
    )


def azure_url(prefix: str) -> str:
    return f"azureblob://{CONTAINER}/{prefix}?connection_string=UseDevelopmentStorage%3Dtrue&create=1"


def make_store(kind: str, tmp_path: Path) -> BlobStore:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    if kind == "local":
        return LocalStore(tmp_path / "payloads")
    if kind == "s3":
        require(9324, "moto's server (S3 and SQS)", "sqs.sh")
        store = blob_store_from_url(s3_url(prefix))
    elif kind == "azureblob":
        require(10000, "Azurite's blob service", "azurite.sh")
        store = blob_store_from_url(azure_url(prefix))
    else:
        raise AssertionError(kind)
    assert store is not None
    return store


STORE_KINDS = [
    pytest.param("local", id="local"),
    pytest.param("s3", id="s3", marks=pytest.mark.sqs),
    pytest.param("azureblob", id="azureblob", marks=pytest.mark.azure),
]


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """A fresh, empty store (unique prefix) on each backend; whatever a test leaves is removed after."""
    made = make_store(request.param, tmp_path)
    yield made
    async for info in made.list():
        await made.delete(info.key)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "payloads")


StoreFactory = Callable[[str], BlobStore]

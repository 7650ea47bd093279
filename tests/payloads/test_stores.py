"""Every blob store against its real service: put/get/delete/list, missing keys, expiry, URLs, secrets."""

from __future__ import annotations

import ast
import re
import sys
import time
from pathlib import Path

import pytest

from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.payloads import (
    BlobStore,
    LocalStore,
    PayloadCorrupt,
    PayloadMissing,
    PayloadStoreError,
    blob_store_from_url,
)
from tests.payloads.conftest import azure_url, require, s3_url


async def test_put_get_list_delete(store: BlobStore) -> None:
    data = bytes(range(256)) * 1000
    await store.put("20250101/a.tsb", data)
    await store.put("20250101/b.tsb", b"")
    assert await store.get("20250101/a.tsb") == data
    assert await store.get("20250101/b.tsb") == b""
    listed = {info.key: info.size async for info in store.list()}
    assert listed == {"20250101/a.tsb": len(data), "20250101/b.tsb": 0}
    await store.delete("20250101/a.tsb")
    await store.delete("20250101/a.tsb")  # deleting twice is fine
    assert [info.key async for info in store.list()] == ["20250101/b.tsb"]


async def test_missing_key_raises_payload_missing(store: BlobStore) -> None:
    with pytest.raises(PayloadMissing, match=r"nope\.tsb"):
        await store.get("nope.tsb")


async def test_expire_removes_only_old_payload_blobs(store: BlobStore) -> None:
    await store.put("old.tsb", b"1")
    await store.put("keep.txt", b"2")
    assert await store.expire(3600) == 0  # nothing is an hour old
    future = time.time() + 7200
    assert await store.expire(3600, now=future) == 1  # seen from two hours later, old.tsb is stale
    assert [info.key async for info in store.list()] == ["keep.txt"]


@pytest.mark.parametrize("key", ["../escape.tsb", "a/../../b.tsb", "/abs.tsb", "a//b.tsb", "sp ace.tsb", ""])
async def test_unsafe_keys_are_refused(local_store: LocalStore, key: str) -> None:
    with pytest.raises(PayloadCorrupt, match="refusing blob key"):
        await local_store.get(key)


def test_store_urls_parse_and_locations_carry_no_secrets(tmp_path: object) -> None:
    local = blob_store_from_url("file:///var/tmp/ts-payloads")
    assert isinstance(local, LocalStore) and local.location.endswith("/var/tmp/ts-payloads")
    s3 = blob_store_from_url(s3_url("some/prefix"))
    assert s3 is not None and s3.location == "s3://taskstream-tests/some/prefix/"
    secret = "QWNjb3VudEtleVNlY3JldA=="
    conn = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={secret};EndpointSuffix=core.windows.net"
    azure = blob_store_from_url(f"azureblob://box/p?connection_string={conn.replace('=', '%3D').replace(';', '%3B')}")
    assert azure is not None and azure.location == "azureblob://acct/box/p/"
    assert secret not in repr(azure) and "testing" not in repr(s3)
    assert blob_store_from_url("none") is None and blob_store_from_url("") is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x/y", "unknown payload store URL scheme 'ftp'"),
        ("file://otherhost/dir", "names host 'otherhost'"),
        ("s3:///prefix", "needs a bucket"),
        ("azureblob://box/p?connection_string=AccountKey%3Dsecret", "names no account"),
    ],
)
def test_bad_store_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        blob_store_from_url(url)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "named", "suggested"),
    [
        ("file:///var/tmp/x?create=1", "unknown local payload store URL parameter 'create'", None),
        ("s3://bucket/p?regoin=eu-west-1", "unknown S3 payload store URL parameter 'regoin'", "region"),
        (
            "azureblob://box/p?connection_string=UseDevelopmentStorage%3Dtrue&craete=1",
            "unknown Azure Blob payload store URL parameter 'craete'",
            "create",
        ),
    ],
)
def test_an_unknown_store_option_is_refused_by_name_with_the_url(url: str, named: str, suggested: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        blob_store_from_url(url)
    message = str(info.value)
    assert named in message and f"in '{url.split('?')[0]}?" in message
    assert "UseDevelopmentStorage" not in message  # the connection string is redacted
    if suggested is not None:
        assert f"(did you mean {suggested!r}?)" in message


def test_store_option_values_are_typed_and_secrets_stay_hidden() -> None:
    with pytest.raises(ConfigurationError, match=r"create='maybe' is not a valid value \(expected true or false\)"):
        blob_store_from_url("s3://bucket/p?create=maybe")
    from taskstream.payloads.s3 import S3Store

    for store in (blob_store_from_url("s3://bucket/p?create=yes"), blob_store_from_url("s3://bucket/p", create=True)):
        assert isinstance(store, S3Store) and store.create is True
    with pytest.raises(ConfigurationError) as info:
        blob_store_from_url("s3://bucket/p?aws_secret_access_key=secret&bogus=1")
    assert "secret" not in str(info.value).replace("aws_secret_access_key", "")


def test_a_mistyped_scheme_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match=r"scheme 'fil' .*did you mean file://\?"):
        blob_store_from_url("fil:///var/tmp/x")


@pytest.mark.parametrize(
    ("url", "driver", "install"),
    [
        ("s3://bucket/p", "aiobotocore", "taskstream[s3]"),
        (
            "azureblob://box/p?connection_string=UseDevelopmentStorage%3Dtrue",
            "azure.storage.blob.aio",
            "taskstream[azure]",
        ),
    ],
)
def test_a_missing_client_library_names_its_pip_install(
    monkeypatch: pytest.MonkeyPatch, url: str, driver: str, install: str
) -> None:
    monkeypatch.setitem(sys.modules, driver, None)  # importing it now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=rf"pip install '{re.escape(install)}'"):
        blob_store_from_url(url)


def test_options_override_the_url_query() -> None:
    from taskstream.payloads.s3 import S3Store

    store = blob_store_from_url("s3://bucket/p?create=0&region=eu-west-1", create=True)
    assert isinstance(store, S3Store) and store.create


def test_the_factory_imports_no_backend_by_name() -> None:
    """base.py finds the stores through its scheme table (module:Class strings), so no base <-> backend cycle."""
    import taskstream.payloads.base as base

    tree = ast.parse(Path(base.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("taskstream.payloads.")}


@pytest.mark.sqs
async def test_unreachable_s3_raises_store_error_without_secrets() -> None:
    store = blob_store_from_url(
        "s3://b/p?endpoint_url=http://127.0.0.1:9&region=us-east-1&aws_access_key_id=AKIDX"
        "&aws_secret_access_key=topsecret"
    )
    assert store is not None
    with pytest.raises(PayloadStoreError) as info:
        await store.get("x.tsb")
    assert "topsecret" not in str(info.value) and "s3://b/p/" in str(info.value)


@pytest.mark.azure
async def test_unreachable_azure_raises_store_error_without_secrets() -> None:
    require(10000, "Azurite's blob service", "azurite.sh")
    conn = "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=c2VjcmV0a2V5;BlobEndpoint=http://127.0.0.1:9/acct"
    store = blob_store_from_url(f"azureblob://box?connection_string={conn.replace('=', '%3D').replace(';', '%3B')}")
    assert store is not None
    with pytest.raises(PayloadStoreError) as info:
        await store.put("x.tsb", b"1")
    assert "c2VjcmV0a2V5" not in str(info.value)


@pytest.mark.sqs
async def test_s3_bucket_missing_without_create_is_a_store_error() -> None:
    require(9324, "moto's server (S3 and SQS)", "sqs.sh")
    url = s3_url("p").replace("taskstream-tests", "taskstream-no-such-bucket").replace("&create=1", "")
    store = blob_store_from_url(url)
    assert store is not None
    with pytest.raises(PayloadStoreError, match="NoSuchBucket"):
        await store.put("x.tsb", b"1")


@pytest.mark.azure
async def test_azure_url_round_trip_on_azurite() -> None:
    require(10000, "Azurite's blob service", "azurite.sh")
    store = blob_store_from_url(azure_url("roundtrip"))
    assert store is not None and store.location == "azureblob://devstoreaccount1/taskstream-tests/roundtrip/"
    await store.put("k.tsb", b"abc")
    assert await store.get("k.tsb") == b"abc"
    await store.delete("k.tsb")

"""Large payloads by reference: the blob format and the claim-check round trip against doing it by hand.

Rows (400,000 2-D float64 points, 6.4 MB of raw data, as in scenario S3; lower is better):

1. *codec*: encode + decode of the envelope in the blob format (raw buffers) against the inline codec
   (base64 inside JSON), in milliseconds, and the encoded sizes in MB.
2. *round trip* per store: ``ClaimCheck.offload`` + ``ClaimCheck.load`` (encode, SHA-256, put, get, verify,
   decode) against the hand-written claim-check the seed's users wrote: put the inline JSON bytes with the
   store's own client, get them back, decode. Local directory, S3 on moto (127.0.0.1:9324), Azure Blob on
   Azurite (127.0.0.1:10000); a store whose service does not answer is left out.

Run: ``python benchmarks/bench_payloads.py``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from common import Row, print_rows  # noqa: E402

from taskstream.messages import Envelope, decode, encode  # noqa: E402
from taskstream.payloads import BlobStore, ClaimCheck, LocalStore, blob_store_from_url, decode_blob, encode_blob  # noqa: E402

MOTO = "http://127.0.0.1:9324"


def envelope() -> Envelope:
    points = np.random.default_rng(7).random((400_000, 2))
    return Envelope(kind="task", body={"args": [points], "kwargs": {"k": 7}})


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def codec_rows(repeats: int) -> list[Row]:
    env = envelope()
    blob_ms, json_ms = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        decode_blob(encode_blob(env))
        blob_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        decode(encode(env))
        json_ms.append((time.perf_counter() - started) * 1000)
    blob_mb, json_mb = len(encode_blob(env)) / 1e6, len(encode(env)) / 1e6
    return [
        Row("payload codec encode+decode", "blob format", "base64 in JSON", "ms", blob_ms, json_ms, False),
        Row("payload codec size", "blob format", "base64 in JSON", "MB", [blob_mb], [json_mb], False),
    ]


async def by_hand(store: BlobStore, env: Envelope) -> float:
    """Baseline: the store's own put/get of the inline JSON bytes, then decode (no checksum)."""
    started = time.perf_counter()
    key = f"hand/{uuid.uuid4().hex}.json"
    await store.put(key, encode(env))
    decode(await store.get(key))
    elapsed = time.perf_counter() - started
    await store.delete(key)
    return elapsed * 1000


async def claim_check(check: ClaimCheck, env: Envelope) -> float:
    started = time.perf_counter()
    ref = await check.offload(env)
    await check.load(ref)
    elapsed = time.perf_counter() - started
    await check.release(ref)
    return elapsed * 1000


def stores(tmp: str) -> list[tuple[str, BlobStore]]:
    found: list[tuple[str, BlobStore]] = [("local directory", LocalStore(Path(tmp) / "payloads"))]
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    if answers(9324):
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        s3 = blob_store_from_url(f"s3://taskstream-bench/{prefix}?endpoint_url={MOTO}&region=us-east-1&create=1")
        assert s3 is not None
        found.append(("S3 (moto)", s3))
    if answers(10000):
        azure = blob_store_from_url(
            f"azureblob://taskstream-bench/{prefix}?connection_string=UseDevelopmentStorage%3Dtrue&create=1"
        )
        assert azure is not None
        found.append(("Azure Blob (Azurite)", azure))
    return found


async def round_trip_rows(repeats: int) -> list[Row]:
    env = envelope()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, store in stores(tmp):
            check = ClaimCheck(store)
            await claim_check(check, env)  # warm up (bucket/container creation, client models)
            ours, theirs = [], []
            for _ in range(repeats):
                ours.append(await claim_check(check, env))
                theirs.append(await by_hand(store, env))
            rows.append(
                Row(f"claim-check round trip, {name}", "ClaimCheck", "put/get JSON by hand", "ms", ours, theirs, False)
            )
    return rows


def measure(repeats: int = 3) -> list[Row]:
    rows = codec_rows(max(repeats, 3))
    rows += asyncio.run(round_trip_rows(repeats))
    return rows


def main(argv: list[str]) -> Any:
    print_rows(measure(int(argv[1]) if len(argv) > 1 else 5))


if __name__ == "__main__":
    main(sys.argv)

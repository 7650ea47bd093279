"""Scenario S3, KMeans on the edge device: big inputs by reference.

400,000 random 2-D points (6.4 MB of float64) go to a remote ``cluster(points, k=7)`` task, and the codes
(one label per point) and the 7 centers come back. That is far more than Azure Queues (64 KiB) or SQS (1 MiB)
carry: the producer stores the payload in a blob store and sends a reference; the consumer fetches and checks
it before the function runs; each payload is deleted once its message is acked. Nothing in the code below
deals with it: only ``TASKSTREAM_PAYLOAD_STORE_URL`` says where payloads go.

Run it through Azure Queues on Azurite (payloads in Azurite's blob service) and through SQS on moto (payloads
in moto's S3), after ``bash scripts/services.sh``::

    python examples/kmeans_edge.py            # both
    python examples/kmeans_edge.py azure      # one of them
    python examples/kmeans_edge.py sqs

Each run prints the time, the payload sizes, the centers, and checks that the remote result equals a local
run of ``cluster`` and that no payload is left in the store and no message on the queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from taskstream import App
from taskstream.messages import encode
from taskstream.payloads import BlobStore, blob_store_from_url

N_POINTS = 400_000
K = 7

RUNS: dict[str, tuple[str, str]] = {
    # name: (broker URL, payload store URL)
    "azure": (
        "azurequeue://devstorage",
        "azureblob://taskstream-kmeans/edge?connection_string=UseDevelopmentStorage%3Dtrue&create=1",
    ),
    "sqs": (
        "sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324",
        "s3://taskstream-kmeans/edge?endpoint_url=http://127.0.0.1:9324&region=us-east-1&create=1",
    ),
}


def make_points(n: int = N_POINTS, k: int = K, seed: int = 42) -> np.ndarray:
    """``n`` 2-D points around ``k`` random centres (float64, shape ``(n, 2)``)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, size=(k, 2))
    labels = rng.integers(0, k, size=n)
    return centres[labels] + rng.normal(scale=0.8, size=(n, 2))


def cluster(points: np.ndarray, k: int = K, iterations: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; returns ``(codes, centers)`` like ``scipy.cluster.vq.kmeans2``.

    Deterministic for a given ``seed``, so a remote run can be checked against a local one.
    """
    rng = np.random.default_rng(seed)
    centers = np.empty((k, points.shape[1]))
    centers[0] = points[rng.integers(len(points))]
    closest = ((points - centers[0]) ** 2).sum(axis=1)
    for i in range(1, k):
        centers[i] = points[rng.choice(len(points), p=closest / closest.sum())]
        closest = np.minimum(closest, ((points - centers[i]) ** 2).sum(axis=1))
    codes = np.zeros(len(points), dtype=np.int32)
    for _ in range(iterations):
        distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        new_codes = distances.argmin(axis=1).astype(np.int32)
        for i in range(k):
            members = points[new_codes == i]
            if len(members):
                centers[i] = members.mean(axis=0)
        if np.array_equal(new_codes, codes):
            break
        codes = new_codes
    return codes, centers


@dataclass
class Outcome:
    """What one run measured and checked."""

    broker: str
    seconds: float
    request_bytes: int
    result_bytes: int
    centers: np.ndarray
    matches_local: bool
    blobs_left: int
    messages_left: int


async def count_blobs(store: BlobStore) -> int:
    return len([info async for info in store.list()])


async def run(name: str, broker_url: str, store_url: str, *, prefix: str = "kmeans") -> Outcome:
    """Call ``cluster(points, k=7)`` on an edge worker through ``broker_url``; return what was measured.

    The edge device (``edge``, serving the task) and the client (submitting it) are two Apps with their own
    connections, as they would be on two machines; both read the payload store from
    ``TASKSTREAM_PAYLOAD_STORE_URL``. The client only knows the task's name and queue.
    """
    os.environ["TASKSTREAM_PAYLOAD_STORE_URL"] = store_url
    store = blob_store_from_url(store_url)
    assert store is not None
    queue = f"{prefix}-points"

    edge = App(broker=broker_url, workers=True)
    edge.task(queue=queue, timeout=300)(cluster)
    client = App(broker=broker_url, workers=False)
    remote_cluster = client.remote("cluster", queue=queue)

    points = make_points()
    started = time.perf_counter()
    async with edge, client:
        codes, centers = await asyncio.wait_for(remote_cluster.submit(points, k=K), timeout=300)
        seconds = time.perf_counter() - started
        # The client deletes the result's payload once it has read and acked the reply: wait for that.
        async with asyncio.timeout(30):
            while await count_blobs(store):
                await asyncio.sleep(0.1)
        await edge.stop()  # the edge device goes away before its queue does
        messages_left = 0
        for name_ in (queue, client.broker.dead_letter_name(queue)):
            messages_left += await client.broker.depth(name_)
        for name_ in (queue, client.broker.dead_letter_name(queue)):
            with contextlib.suppress(Exception):
                await client.broker.delete_queue(name_)
    local_codes, local_centers = cluster(points, k=K)
    return Outcome(
        broker=name,
        seconds=seconds,
        request_bytes=len(encode_request({"points": points, "k": K})),
        result_bytes=len(encode_request([codes, centers])),
        centers=centers,
        matches_local=bool(np.array_equal(codes, local_codes) and np.allclose(centers, local_centers)),
        blobs_left=await count_blobs(store),
        messages_left=messages_left,
    )


def encode_request(body: dict[str, Any]) -> bytes:
    """What the body would weigh inline (base64 in JSON), for the printout."""
    from taskstream.messages import Envelope

    return encode(Envelope(body=body))


async def main(names: list[str]) -> list[Outcome]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    outcomes = []
    for name in names:
        broker_url, store_url = RUNS[name]
        outcome = await run(name, broker_url, store_url, prefix=f"kmeans-{uuid.uuid4().hex[:6]}")
        outcomes.append(outcome)
        print(
            f"{name:6s} {N_POINTS:,} points, k={K}: {outcome.seconds:.1f} s round trip; inline the request would be "
            f"{outcome.request_bytes / 1e6:.1f} MB and the result {outcome.result_bytes / 1e6:.1f} MB; "
            f"same as a local run: {outcome.matches_local}; payloads left: {outcome.blobs_left}; "
            f"messages left: {outcome.messages_left}"
        )
        print("       centers:", np.array2string(outcome.centers, precision=2, separator=", ").replace("\n", ""))
    return outcomes


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(RUNS)
    unknown = [n for n in chosen if n not in RUNS]
    if unknown:
        sys.exit(f"unknown run {unknown}; choose from {list(RUNS)}")
    asyncio.run(main(chosen))

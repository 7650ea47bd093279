"""Scenario S3, KMeans on the edge device: big inputs by reference.

400,000 random 2-D points (6.4 MB of float64) go to a remote ``cluster(points, k=7)`` function, and the codes
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
from taskstream.consumer import Message
from taskstream.messages import encode
from taskstream.payloads import BlobStore, store_from_url

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


def cluster_request(request: dict[str, Any]) -> dict[str, Any]:
    """The remote function: a request ``{"points": array, "k": 7}`` in, ``{"codes", "centers"}`` out."""
    codes, centers = cluster(request["points"], k=int(request["k"]))
    return {"codes": codes, "centers": centers}


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
    """Send the points through ``broker_url`` with payloads in ``store_url``; return what was measured.

    The edge device (``worker``) and the client are two Apps with their own connections, as they would be on
    two machines; both read the payload store from ``TASKSTREAM_PAYLOAD_STORE_URL``.
    """
    os.environ["TASKSTREAM_PAYLOAD_STORE_URL"] = store_url
    store = store_from_url(store_url)
    assert store is not None
    requests, results = f"{prefix}-points", f"{prefix}-clusters"

    worker = App(broker=broker_url)
    worker.consumer(requests, publish_to=results, concurrency=1, handler_timeout=300)(cluster_request)

    client = App(broker=broker_url)
    loop = asyncio.get_running_loop()
    answers: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @client.consumer(results, concurrency=1)
    async def collect(result: dict[str, Any], message: Message) -> None:
        future = answers.get(message.envelope.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(result)

    points = make_points()
    request = {"points": points, "k": K}
    started = time.perf_counter()
    async with worker, client:
        request_id = await client.publish(requests, request, kind="task")
        answers[request_id] = loop.create_future()
        result = await asyncio.wait_for(answers[request_id], timeout=300)
        seconds = time.perf_counter() - started
        # The client acks after `collect` returns, then deletes the result's payload: wait for that.
        async with asyncio.timeout(30):
            while client.consumers[0].stats.acked < 1 or await count_blobs(store):
                await asyncio.sleep(0.1)
        messages_left = 0
        for queue in (requests, results):
            messages_left += await client.broker.depth(queue)
            messages_left += await client.broker.depth(client.broker.dead_letter_name(queue))
        for queue in (requests, results):
            for name_ in (queue, client.broker.dead_letter_name(queue)):
                with contextlib.suppress(Exception):
                    await client.broker.delete_queue(name_)
    local_codes, local_centers = cluster(points, k=K)
    return Outcome(
        broker=name,
        seconds=seconds,
        request_bytes=len(encode_request(request)),
        result_bytes=len(encode_request(result)),
        centers=result["centers"],
        matches_local=bool(
            np.array_equal(result["codes"], local_codes) and np.allclose(result["centers"], local_centers)
        ),
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

"""Scenario S3: 400,000 points to a remote cluster(points, k=7) by reference, on Azurite and on moto."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from examples import kmeans_edge
from tests.payloads.conftest import azure_url, require, s3_url


def check(outcome: kmeans_edge.Outcome) -> None:
    assert outcome.request_bytes > 8_000_000  # far over either broker's limit inline
    assert outcome.result_bytes > 1_000_000
    assert outcome.matches_local  # the codes and centers that came back are the ones a local run computes
    assert outcome.centers.shape == (7, 2)
    assert outcome.blobs_left == 0  # both payloads (points and result) were deleted after their acks
    assert outcome.messages_left == 0


@pytest.mark.azure
async def test_kmeans_through_azure_queues_with_azure_blob(monkeypatch: pytest.MonkeyPatch) -> None:
    require(10001, "Azurite's queue service", "azurite.sh")
    require(10000, "Azurite's blob service", "azurite.sh")
    store = azure_url(f"kmeans-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("TASKSTREAM_PAYLOAD_STORE_URL", store)
    broker_url, _ = kmeans_edge.RUNS["azure"]
    check(await kmeans_edge.run("azure", broker_url, store, prefix=f"km-{uuid.uuid4().hex[:8]}"))


@pytest.mark.sqs
async def test_kmeans_through_sqs_with_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    require(9324, "moto's server (S3 and SQS)", "sqs.sh")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = s3_url(f"kmeans-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("TASKSTREAM_PAYLOAD_STORE_URL", store)
    broker_url, _ = kmeans_edge.RUNS["sqs"]
    check(await kmeans_edge.run("sqs", broker_url, store, prefix=f"km-{uuid.uuid4().hex[:8]}"))


def test_cluster_finds_the_seven_blobs() -> None:
    points = kmeans_edge.make_points(n=20_000)
    codes, centers = kmeans_edge.cluster(points, k=7)
    assert codes.shape == (20_000,) and centers.shape == (7, 2)
    assert len(np.unique(codes)) == 7
    # every point is nearer its own center than any other (a fixed point of Lloyd's iteration)
    distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == codes).mean() > 0.999

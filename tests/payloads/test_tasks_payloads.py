"""Task arguments and results by reference: App.task with a small broker limit, and on SQS and Azure."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskstream.app import App
from taskstream.brokers.memory import MemoryBroker
from taskstream.payloads import blob_store_from_url
from taskstream.settings import Settings
from tests.payloads.conftest import azure_url, s3_url


def total(points: np.ndarray, scale: float = 1.0) -> dict[str, Any]:
    return {"sum": float(points.sum()), "scaled": points * scale}


async def count(url: str) -> int:
    store = blob_store_from_url(url)
    assert store is not None
    return len([b async for b in store.list()])


async def roundtrip(app: App, store_url: str, queue: str) -> None:
    task = app.task(queue=queue)(total)
    points = np.random.default_rng(0).random((100_000, 2))
    async with app:
        result = await asyncio.wait_for(task.submit(points, scale=2.0), 120)
        assert result["sum"] == pytest.approx(points.sum())
        assert np.array_equal(result["scaled"], points * 2.0)
        async with asyncio.timeout(20):
            while await count(store_url):
                await asyncio.sleep(0.1)


async def test_task_arguments_and_results_by_reference_on_memory(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/payloads"
    settings = Settings(payload_store_url=url, shutdown_grace=2.0)  # type: ignore[arg-type]
    app = App(
        broker=MemoryBroker(f"t-{uuid.uuid4().hex[:6]}", max_message_bytes=16_384), settings=settings, workers=True
    )
    await roundtrip(app, url, "tq")


@pytest.mark.sqs
async def test_task_payloads_on_sqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = s3_url(f"tasks-{uuid.uuid4().hex[:8]}")
    settings = Settings(payload_store_url=url, shutdown_grace=2.0)  # type: ignore[arg-type]
    app = App(broker="sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324&wait_time=2", settings=settings, workers=True)
    await roundtrip(app, url, f"tq-{uuid.uuid4().hex[:8]}")


@pytest.mark.azure
async def test_task_payloads_on_azure() -> None:
    url = azure_url(f"tasks-{uuid.uuid4().hex[:8]}")
    settings = Settings(payload_store_url=url, shutdown_grace=2.0)  # type: ignore[arg-type]
    app = App(broker="azurequeue://devstorage", settings=settings, workers=True)
    await roundtrip(app, url, f"tq-{uuid.uuid4().hex[:8]}")

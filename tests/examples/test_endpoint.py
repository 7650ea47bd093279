"""S2 (funcX endpoint): submit by name, ids at once, status and results by id from another client, a batch, Jupyter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from examples import endpoint
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.names import unique
from tests.support.queues import delete_queues_sync


def check(report: dict[str, Any]) -> None:
    assert report["single"] == "physics"
    assert report["statuses"][-1] == "success" and set(report["statuses"]) <= {"pending", "running", "success"}
    assert report["batch"] == ["math", "physics", "biology", "finance", "computer science"]
    assert report["word_counts"] == [len(t.split()) for t in endpoint.ABSTRACTS]
    later = report["later"]
    assert [i.status for i in later] == ["success"] * 3 and later[0].outcome() == "physics"
    assert all(i.started_at is not None and i.finished_at is not None for i in later)
    assert report["notebook"] == (3, "math")


@pytest.mark.memory
def test_endpoint_in_process() -> None:
    check(endpoint.main([]))


@pytest.mark.rabbitmq
def test_endpoint_as_a_separate_worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKSTREAM_RESULT_STORE_URL", f"sqlite:///{tmp_path / 'results.sqlite3'}")
    queue = unique("endpoint")  # not the example's fixed name: runs on the shared broker must not meet
    try:
        report = endpoint.main(["--broker", URL, "--start-endpoint", "--queue", queue])
    finally:
        delete_queues_sync(URL, queue)
    check(report)
    assert "running" in report["statuses"]  # the client saw the worker pick it up

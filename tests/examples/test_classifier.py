"""S5 (model serving): the model loads once per worker process, blocks run concurrently, idle workers stop."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples import classifier
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.names import unique
from tests.support.queues import delete_queues_sync

QUICK = ["--docs", "40", "--max-blocks", "4", "--load-scale", "0.1", "--item-scale", "0.1", "--max-workers", "2"]


def check(report: classifier.Report, capsys: pytest.CaptureFixture[str]) -> None:
    assert [row.blocks for row in report.rows] == [1, 2, 3, 4]
    assert report.calls == 1 + 2 + 3 + 4
    assert 1 <= report.loads <= 2 < report.calls  # once per worker process, never per call
    assert all(1 <= row.workers <= 2 for row in report.rows)
    assert report.accuracy > 0.6  # the stand-in model really classifies
    printed = capsys.readouterr().out
    assert "model load C =" in printed and "funcX would have loaded 10 times" in printed


@pytest.mark.memory
def test_classifier_in_process_workers(capsys: pytest.CaptureFixture[str]) -> None:
    report = classifier.main([*QUICK, "--idle-timeout", "0.5"])
    check(report, capsys)
    assert report.pool_after_idle == 1  # grown workers stopped again when idle, down to the minimum


@pytest.mark.rabbitmq
def test_classifier_with_an_autoscaling_worker_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKSTREAM_RESULT_STORE_URL", f"sqlite:///{tmp_path / 'results.sqlite3'}")
    queue = unique("classifier")  # not the example's fixed name: runs on the shared broker must not meet
    try:
        report = classifier.main([*QUICK, "--broker", URL, "--queue", queue])
    finally:
        delete_queues_sync(URL, queue)
    check(report, capsys)

"""S1 (Parsl's pi bag of tasks): the example runs, times every block size, prints the table and writes the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples import pi_bag_of_tasks
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.names import unique
from tests.support.queues import delete_queues_sync


def check(report: pi_bag_of_tasks.Report, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert list(report.blocks) == [1, 2, 4]
    assert len(report.estimates) == 3 * 8
    assert all(2.9 < e < 3.4 for e in report.estimates)
    assert report.plot == out and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "8 x pi(20000)" in printed and "seed Dask" in printed
    assert printed.count("x  ") >= 3  # one row per block size, with its speed-up


@pytest.mark.memory
def test_pi_bag_of_tasks_on_the_memory_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pi.png"
    report = pi_bag_of_tasks.main(["--calls", "8", "--n", "20000", "--blocks", "1,2,4", "--out", str(out)])
    check(report, out, capsys)


@pytest.mark.rabbitmq
def test_pi_bag_of_tasks_on_rabbitmq(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKSTREAM_RESULT_STORE_URL", f"sqlite:///{tmp_path / 'results.sqlite3'}")  # worker too
    out = tmp_path / "pi.png"
    queue = unique("pi")  # not the example's fixed "pi": a second run on the shared broker must not meet this one
    argv = ["--calls", "8", "--n", "20000", "--blocks", "1,2,4", "--out", str(out), "--broker", URL, "--queue", queue]
    try:
        report = pi_bag_of_tasks.main(argv)
    finally:
        delete_queues_sync(URL, queue)
    check(report, out, capsys)

"""Scenario S7 (ZeroMQ pub/sub through a forwarder): every reading of a subscribed topic arrives, in order."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from examples import zmq_pubsub

pytestmark = pytest.mark.zmq

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "zmq_pubsub.py"


async def test_each_subscriber_sees_exactly_its_topic_from_both_publishers() -> None:
    report = await zmq_pubsub.main(count=30, rate=200.0)
    assert report.dropped == 0
    assert report.missed == {"3": 0, "5": 0}
    expected = {"fast": 60, "slow": 30}
    assert report.sent == {name: n + 2 for name, n in expected.items()}  # + one stop per topic
    for topic, parity in (("3", 0), ("5", 1)):
        readings = report.seen[topic]
        assert {r["topic"] for r in readings} == {topic}
        for name, count in expected.items():
            mine = [r["n"] for r in readings if r["publisher"] == name]
            assert mine == [n for n in range(count) if n % 2 == parity], f"{name} on topic {topic}"


async def test_runs_standalone_and_prints_the_summary() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--count", "10", "--rate", "100", stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    text = out.decode()
    assert "topic 3: 15 readings {'fast': 10, 'slow': 5}, missed 0" in text
    assert "topic 5: 15 readings {'fast': 10, 'slow': 5}, missed 0" in text

"""Hosts apart: RabbitMQ in one network namespace, ``taskstream run`` workers in two others, a link cut mid-run.

Each namespace is a host with its own network stack, joined to the broker's namespace by a veth pair. A publisher
on the second host sends messages with confirms while a worker on each host consumes them; the first host's link
goes down for 5 s (long enough for the heartbeats, 1 s here, to give up on both sides) and comes back. The worker
whose link was cut reconnects by itself; every confirmed message is handled, and the duplicates (what the cut
worker held, redelivered to the other one) are counted and reported.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.nodes import ScriptCluster
from tests.cluster.traffic import Worker, handled
from tests.netns.hosts import Network
from tests.netns.publisher import spawn
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = 8_000
CUT_SECONDS = 5.0


async def test_link_cut_between_hosts(
    network: Network, broker_node: ScriptCluster, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    queue = f"netns.orders-{uuid.uuid4().hex[:8]}"
    first, second = network.hosts
    port = broker_node.port(1)

    def url(host_address: str, name: str) -> str:
        return f"amqp://guest:guest@{host_address}:{port}/?heartbeat=1&name={name}"

    started = time.monotonic()
    events: list[str] = []

    def note(event: str) -> None:
        events.append(f"{time.monotonic() - started:6.1f} s  {event}")

    out = tmp_path / "published.json"
    publisher = spawn(second.exec_prefix(), url(second.broker_address, "netns-publisher"), queue, MESSAGES, tmp_path)
    # the queue exists once the publisher declared it; the workers declare it too
    workers = [
        Worker(tmp_path, "w1", url(first.broker_address, "netns-w1"), queue, delay=0.004, prefix=first.exec_prefix()),
        Worker(tmp_path, "w2", url(second.broker_address, "netns-w2"), queue, delay=0.004, prefix=second.exec_prefix()),
    ]
    try:
        await wait_for(lambda: len(workers[0].seen()) >= 300, what="w1 handling messages", timeout=120, interval=0.2)
        note(f"cutting {first.namespace}'s link, {len(handled(workers))} handled")
        first.cut()
        await asyncio.sleep(CUT_SECONDS)
        first.restore()
        during = len(handled(workers))
        note(f"link restored, {during} handled")
        assert during < MESSAGES, "the run ended before the link came back: slow the workers down"
        seen_by_w1 = len(workers[0].seen())
        await wait_for(lambda: len(workers[0].seen()) > seen_by_w1, what="w1 handling again after the cut", timeout=120)
        note("w1 handles messages again")
        assert await asyncio.to_thread(publisher.wait, 300) == 0, (tmp_path / "publisher.err").read_text()
        published = json.loads(out.read_text(encoding="utf-8"))
        confirmed: list[int] = published["confirmed"]
        await wait_for(
            lambda: set(confirmed) <= set(handled(workers)),
            what="every confirmed message handled",
            timeout=300,
            interval=0.5,
        )
        note("all confirmed messages handled")
        counts = handled(workers)
        assert all(worker.alive() for worker in workers), [w.output()[-2000:] for w in workers]
        assert [worker.stop() for worker in workers] == [0, 0], [w.output()[-2000:] for w in workers]
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait(30)
        for worker in workers:
            worker.kill()
    report = {
        "confirmed": len(confirmed),
        "publishes_refused_and_resent": len(published["failures"]),
        "handled_distinct": len(counts),
        "duplicates": sum(counts.values()) - len(counts),
        "handled_by_w1": len(workers[0].seen()),
        "handled_by_w2": len(workers[1].seen()),
        "seconds": round(time.monotonic() - started, 1),
    }
    for key, value in report.items():
        record_property(key, value)
    print("\nlink cut between hosts:", report, *events, sep="\n  ")
    assert len(confirmed) == MESSAGES
    assert "lost" in workers[0].output(), "w1's connection should have been lost and restored"

"""Workers on a three-node RabbitMQ cluster ride out the loss of their node and of their queue's leader.

20,000 messages are published with confirms to a quorum queue while two ``taskstream run`` workers, given a URL
that lists all three nodes, consume it. Mid-run the node one worker is connected to is SIGKILLed (found with
``rabbitmqctl list_connections``), started again, and then the queue's leader is SIGKILLed (found with
``rabbitmqctl list_queues leader``) and started again. Every confirmed message must be handled, the workers must
still be running, and the duplicates (redeliveries of what the dead nodes held) are counted and reported.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.nodes import ScriptCluster
from tests.cluster.traffic import Worker, handled, publish_confirmed
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = 20_000


async def wait_handled(workers: list[Worker], at_least: int, what: str) -> None:
    await wait_for(lambda: len(handled(workers)) >= at_least, what=what, timeout=180, interval=0.2)


async def crash_and_restart(cluster: ScriptCluster, n: int, note: Callable[[str], None]) -> None:
    """SIGKILL node ``n``, then start it again and wait until it is back in the cluster."""
    note(f"SIGKILL {cluster.node(n)}")
    await asyncio.to_thread(cluster.kill, n)
    await asyncio.sleep(3)  # the workers fail over while it is gone
    await asyncio.to_thread(cluster.start_node, n)
    note(f"{cluster.node(n)} restarted")


async def test_cluster_node_and_leader_killed(
    cluster: ScriptCluster, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    queue = f"cluster.orders-{uuid.uuid4().hex[:8]}"
    events: list[str] = []
    started = time.monotonic()

    def note(event: str) -> None:
        events.append(f"{time.monotonic() - started:6.1f} s  {event}")

    query = "queue_type=quorum&heartbeat=5"
    workers = [
        Worker(tmp_path, "w1", cluster.url([1, 2, 3], f"{query}&name=cluster-w1"), queue, delay=0.004),
        Worker(tmp_path, "w2", cluster.url([2, 3, 1], f"{query}&name=cluster-w2"), queue, delay=0.004),
    ]
    try:
        publishing = asyncio.create_task(publish_confirmed(cluster.url(query="queue_type=quorum"), queue, MESSAGES))
        await wait_handled(workers, MESSAGES // 10, "a tenth of the messages handled")

        connections = await wait_for(
            lambda: cluster.connection_nodes().get("cluster-w1"), what="worker w1's connection", timeout=30
        )
        note(f"w1 is connected to {cluster.node(connections)}")
        await crash_and_restart(cluster, connections, note)
        await wait_for(lambda: len(cluster.queue(queue)["online"]) == 3, what="all three members online", timeout=120)
        progress = len(handled(workers))
        leader = cluster.number(cluster.queue(queue)["leader"])
        note(f"queue leader is {cluster.node(leader)}, {progress} handled")
        assert progress < MESSAGES, "the run ended before the leader could be killed: slow the workers down"
        await crash_and_restart(cluster, leader, note)

        confirmed, failures = await publishing
        note(f"{len(confirmed)} confirmed, {len(failures)} publishes refused or failed on the way (sent again)")
        await wait_for(
            lambda: set(confirmed) <= set(handled(workers)),
            what="every confirmed message handled",
            timeout=300,
            interval=0.5,
        )
        counts = handled(workers)
        note("all confirmed messages handled")
        assert all(worker.alive() for worker in workers), [w.output()[-2000:] for w in workers]
        assert [worker.stop() for worker in workers] == [0, 0], [w.output()[-2000:] for w in workers]
    finally:
        for worker in workers:
            worker.kill()

    duplicates = sum(counts.values()) - len(counts)
    unconfirmed_handled = len(set(counts) - set(confirmed))
    report = {
        "confirmed": len(confirmed),
        "publishes_refused_and_resent": len(failures),
        "handled_distinct": len(counts),
        "duplicates": duplicates,
        "handled_but_unconfirmed": unconfirmed_handled,
        "seconds": round(time.monotonic() - started, 1),
    }
    for key, value in report.items():
        record_property(key, value)
    print("\ncluster failover:", report, *events, sep="\n  ")
    assert len(confirmed) == MESSAGES, failures[-5:]

"""Scenario S7: ZeroMQ pub/sub routing through a forwarder device.

A forwarder binds a frontend for publishers and a backend for subscribers. Two publishers send readings on
topics ``3`` and ``5`` alternately, one twice as fast as the other, then a stop message per topic. Two
subscribers each take one topic and return what they saw once every publisher has said stop on it.

Publishers wait until both topics have a subscriber (``wait_subscribed``), so nothing is lost to a late
joiner; every message carries its publisher's sequence number per topic, so a loss would show up in
``missed`` (and the forwarder counts what it drops).

Run it with a forwarder inside this process::

    python examples/zmq_pubsub.py --count 20 --rate 50

or against a running device::

    taskstream zmq-device --pubsub-frontend tcp://127.0.0.1:5556 --pubsub-backend tcp://127.0.0.1:5557
    python examples/zmq_pubsub.py --frontend tcp://127.0.0.1:5556 --backend tcp://127.0.0.1:5557
"""

from __future__ import annotations

import argparse
import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from taskstream.brokers.zeromq import Forwarder, TopicPublisher, TopicSubscriber

TOPICS = ("3", "5")
PUBLISHERS = {"fast": 2.0, "slow": 1.0}  # name -> rate relative to the base rate


@dataclass
class Report:
    """What each subscriber saw, and what each hop counted."""

    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    missed: dict[str, int] = field(default_factory=dict)
    dropped: int = 0


async def publish(frontend: str, name: str, count: int, rate: float) -> int:
    """Send ``count`` readings at ``rate`` per second, alternating topics, then a stop on every topic."""
    async with TopicPublisher(frontend, name=name, on_full="block") as pub:
        await pub.wait_subscribed(*TOPICS)
        rng = random.Random(name)
        for n in range(count):
            topic = TOPICS[n % len(TOPICS)]
            reading = {"publisher": name, "n": n, "topic": topic, "value": round(rng.gauss(20.0, 2.0), 3)}
            await pub.publish(topic, orjson.dumps(reading))
            await asyncio.sleep(1.0 / rate)
        for topic in TOPICS:
            await pub.publish(topic, b"", headers={"stop": True})
        return pub.sent


async def subscribe(backend: str, topic: str, publishers: int, report: Report) -> list[dict[str, Any]]:
    """Collect readings on ``topic`` until each of ``publishers`` has sent its stop."""
    seen: list[dict[str, Any]] = []
    stops = 0
    async with TopicSubscriber(backend, [topic], exact=True) as sub:
        async for message in sub:
            if message.headers.get("stop"):
                stops += 1
                if stops == publishers:
                    break
                continue
            seen.append(orjson.loads(message.body))
        report.missed[topic] = sub.missed
    return seen


async def run(frontend: str, backend: str, count: int, rate: float) -> Report:
    """Run both subscribers and both publishers against a forwarder at ``frontend``/``backend``."""
    report = Report()
    subscribers = {topic: asyncio.create_task(subscribe(backend, topic, len(PUBLISHERS), report)) for topic in TOPICS}
    publishers = {
        name: asyncio.create_task(publish(frontend, name, round(count * speed), rate * speed))
        for name, speed in PUBLISHERS.items()
    }
    async with asyncio.timeout(60 + 2 * count / rate):
        for name, sending in publishers.items():
            report.sent[name] = await sending
        for topic, receiving in subscribers.items():
            report.seen[topic] = await receiving
    return report


async def main(count: int = 20, rate: float = 50.0, frontend: str | None = None, backend: str | None = None) -> Report:
    """S7 end to end; starts its own forwarder unless ``frontend`` and ``backend`` are given.

    The slow publisher sends ``count`` readings at ``rate``/s, the fast one ``2 * count`` at ``2 * rate``/s.
    """
    if frontend and backend:
        return await run(frontend, backend, count, rate)
    async with Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as forwarder:
        report = await run(forwarder.frontend_endpoint, forwarder.backend_endpoint, count, rate)
        report.dropped = forwarder.stats.dropped
    return report


def _cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=20, help="readings from the slow publisher")
    parser.add_argument("--rate", type=float, default=50.0, help="readings per second of the slow publisher")
    parser.add_argument("--frontend", help="forwarder frontend (publishers); default: start one here")
    parser.add_argument("--backend", help="forwarder backend (subscribers)")
    args = parser.parse_args()
    report = asyncio.run(main(args.count, args.rate, args.frontend, args.backend))
    for topic, readings in report.seen.items():
        by_publisher = {name: sum(1 for r in readings if r["publisher"] == name) for name in PUBLISHERS}
        print(f"topic {topic}: {len(readings)} readings {by_publisher}, missed {report.missed[topic]}")
    print(f"sent (incl. stops): {report.sent}, dropped at the forwarder: {report.dropped}")


if __name__ == "__main__":
    _cli()

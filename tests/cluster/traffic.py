"""What the cluster and network-namespace tests share: ``taskstream run`` workers and a confirming publisher.

Workers serve ``tests.e2e.apps:app`` (each handled ``n`` is appended to the worker's log file, flushed before the
ack), optionally under a command prefix such as ``ip netns exec NS``. The publisher counts a message as sent only
once RabbitMQ confirmed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from taskstream.brokers.base import broker_from_url
from taskstream.errors import BrokerConnectionError, PublishError

ROOT = Path(__file__).resolve().parents[2]
TASKSTREAM = str(Path(sys.executable).parent / "taskstream")


class Worker:
    """One ``taskstream run tests.e2e.apps:app --broker URL`` process reading ``queue``."""

    def __init__(self, workdir: Path, name: str, url: str, queue: str, *, delay: float, prefix: Sequence[str] = ()):
        self.name = name
        self.log = workdir / f"{name}.seen"
        self.out = workdir / f"{name}.out"
        env = dict(os.environ)
        env.pop("TASKSTREAM_BROKER_URL", None)
        env.update(
            E2E_QUEUE=queue,
            E2E_LOG=str(self.log),
            E2E_PUBLISH_TO="",
            E2E_DELAY=str(delay),
            TASKSTREAM_RESULT_STORE_URL=f"sqlite:///{workdir / (name + '.results.sqlite3')}",
            TASKSTREAM_SHUTDOWN_GRACE="5",
        )
        with self.out.open("wb") as sink:
            self.process = subprocess.Popen(
                [*prefix, TASKSTREAM, "run", "tests.e2e.apps:app", "--broker", url],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def seen(self) -> list[int]:
        """Every ``n`` this worker handled so far, repeats included."""
        try:
            text = self.log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        return [int(line) for line in lines[:-1] if line]  # the last line may be half written

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM and wait: the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def output(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")


def handled(workers: Iterable[Worker]) -> Counter[int]:
    """How many times each ``n`` was handled, over all ``workers``."""
    counts: Counter[int] = Counter()
    for worker in workers:
        counts.update(worker.seen())
    return counts


async def publish_confirmed(
    url: str, queue: str, count: int, *, chunk: int = 200, resend_for: float = 120.0
) -> tuple[list[int], list[str]]:
    """Publish ``{"n": 0..count-1}`` to ``queue``, ``chunk`` confirms in flight at once.

    A publish RabbitMQ refused (a quorum queue nacks while it has no leader) or could not confirm is sent again,
    as a careful client does, for up to ``resend_for`` seconds.

    Returns:
        The confirmed numbers, and one line per refusal or failure seen on the way (each one clear).
    """
    confirmed: list[int] = []
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    async with broker_from_url(url) as broker:
        dead_letters = broker.dead_letter_name(queue)
        await broker.declare(dead_letters)
        await broker.declare(queue, dead_letter=dead_letters)

        async def send(n: int) -> None:
            deadline = loop.time() + resend_for
            while True:
                try:
                    await broker.publish(queue, b'{"n": %d}' % n, message_id=f"m{n}")
                except (PublishError, BrokerConnectionError) as exc:
                    failures.append(f"{n}: {exc}")
                    if loop.time() > deadline:
                        return
                    await asyncio.sleep(0.2)
                    continue
                confirmed.append(n)
                return

        for start in range(0, count, chunk):
            await asyncio.gather(*(send(n) for n in range(start, min(count, start + chunk))))
    return confirmed, failures

"""Helpers of the end-to-end tests: ``taskstream`` processes, broker URLs, unique queues and their cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from taskstream.brokers.base import Broker, broker_from_url
from tests.brokers.contract.backends.rabbitmq import URL as AMQP_URL
from tests.brokers.contract.backends.sqs import ENDPOINT as SQS_ENDPOINT
from tests.support.require import unavailable
from tests.support.servers import PrivateRabbitMQ, Unavailable

ROOT = Path(__file__).resolve().parents[2]
TASKSTREAM = str(Path(sys.executable).parent / "taskstream")

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

SQS_PREFIX = f"e2e{uuid.uuid4().hex[:6]}-"

#: one URL per real broker; short visibility timeouts so a killed worker's messages come back quickly
URLS = {
    "rabbitmq": AMQP_URL,
    "sqs": f"sqs://us-east-1/?endpoint_url={SQS_ENDPOINT}&queue_prefix={SQS_PREFIX}&visibility_timeout=2&wait_time=2",
    "azure": "azurequeue://devstorage?visibility_timeout=2",
}


def unique(stem: str) -> str:
    """A queue name no other test uses, with a dot in it (SQS and Azure map it to a hyphen)."""
    return f"e2e.{stem}-{uuid.uuid4().hex[:8]}"


class Served:
    """One ``taskstream run|worker TARGET --broker URL`` process started the way a user starts it.

    Its output goes to a file (:meth:`output`); ``E2E_LOG`` collects what the ``record`` handler ran.
    """

    def __init__(self, workdir: Path, url: str, env: dict[str, str], target: str, verb: str) -> None:
        self.url = url
        self.env = env
        self.target = target
        self.verb = verb
        self.workdir = workdir
        self.log = Path(env["E2E_LOG"])
        self.process: subprocess.Popen[bytes] | None = None
        self.outputs: list[Path] = []

    def start(self) -> Served:
        out = self.workdir / f"{self.verb}-{len(self.outputs)}.out"
        self.outputs.append(out)
        with out.open("wb") as sink:
            self.process = subprocess.Popen(
                [TASKSTREAM, self.verb, self.target, "--broker", self.url],
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def seen(self) -> list[int]:
        """The ``n`` of every handler run so far (repeats are redeliveries)."""
        try:
            text = self.log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split()]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as when a machine dies."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    async def terminate(self) -> int:
        """:meth:`stop` from async code: the event loop keeps running (a test's proxy may carry the goodbyes)."""
        return await asyncio.to_thread(self.stop)

    def output(self) -> str:
        return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in self.outputs if p.exists())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """``serve(url, queue, ...)``: a not yet started ``taskstream run`` (or ``verb="worker"``) of the e2e app."""
    made: list[Served] = []

    def make(
        url: str,
        queue: str,
        *,
        publish_to: str | None = None,
        delay: float = 0.005,
        target: str = "tests.e2e.apps:app",
        verb: str = "run",
        task_queue: str | None = None,
        prefetch: int = 64,
    ) -> Served:
        env = dict(os.environ)
        env.pop("TASKSTREAM_BROKER_URL", None)
        env.update(
            E2E_QUEUE=queue,
            E2E_LOG=str(tmp_path / f"{uuid.uuid4().hex[:6]}.seen"),
            E2E_PUBLISH_TO=publish_to or "",
            E2E_DELAY=str(delay),
            E2E_TASK_QUEUE=task_queue or unique("tasks"),  # a worker's task queue: pass one from ``queues``
            TASKSTREAM_PREFETCH=str(prefetch),  # messages a consumer holds: more than its 4 handlers run at once
            TASKSTREAM_RESULT_STORE_URL=f"sqlite:///{tmp_path / 'results.sqlite3'}",
            TASKSTREAM_SHUTDOWN_GRACE="5",
        )
        served = Served(tmp_path, url, env, target, verb)
        made.append(served)
        return served

    yield make
    for served in made:
        if served.alive():
            assert served.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait(30)


@pytest.fixture
def rabbitmq_node(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this test's own, which it may stop and crash (killed afterwards)."""
    node = PrivateRabbitMQ(tmp_path / "rabbitmq")
    node.workdir.mkdir()
    try:
        node.start()
    except Unavailable as exc:
        unavailable(f"a private RabbitMQ node cannot start on this machine: {exc}")
    yield node
    node.kill()


@pytest.fixture
async def queues() -> AsyncIterator[Callable[[str, str], str]]:
    """``queues(url, stem)``: a unique queue name, deleted (with its dead-letter queue) after the test."""
    made: list[tuple[str, str]] = []

    def make(url: str, stem: str) -> str:
        name = unique(stem)
        made.append((url, name))
        return name

    yield make
    by_url: dict[str, list[str]] = {}
    for url, name in made:
        by_url.setdefault(url, []).append(name)
    for url, names in by_url.items():
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30), connected(url) as broker:
                for name in names:
                    for queue in (name, broker.dead_letter_name(name)):
                        with contextlib.suppress(Exception):
                            await broker.delete_queue(queue)


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Broker]:
    """A connected broker for ``url``, closed afterwards."""
    broker = broker_from_url(url)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()

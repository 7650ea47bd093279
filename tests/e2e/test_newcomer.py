"""What a newcomer runs from the README: the two-stage app served on each broker and fed by plain clients
(``examples/plain_clients.py``), and the CLI telling them when a command cannot work as typed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

from tests.e2e.conftest import ROOT, SQS_ENDPOINT, TASKSTREAM, Served, connected
from tests.support.waiting import wait_for

SHARED = {"rabbitmq": "amqp://guest:guest@127.0.0.1:5672/", "sqs": "", "azure": "azurequeue://devstorage"}


@pytest.mark.parametrize(
    "backend", [pytest.param(name, marks=getattr(pytest.mark, name), id=name) for name in ("rabbitmq", "sqs", "azure")]
)
async def test_readme_two_stage_app_fed_by_plain_clients(backend: str, serve: Callable[..., Served]) -> None:
    url = SHARED[backend]
    if backend == "sqs":
        # A prefix of its own: on SQS a receive abandoned by a process that stopped can still take a message,
        # which then stays hidden for its visibility timeout (moto does this for up to 20 s after a stop).
        url = f"sqs://us-east-1/?endpoint_url={SQS_ENDPOINT}&queue_prefix=e2e{uuid.uuid4().hex[:8]}-&wait_time=2"
    async with connected(url) as broker:  # leftovers of an earlier run would be read as results
        for queue in ("orders.in", "orders.priced", "orders.out"):
            await broker.declare(queue)
            await broker.purge(queue)
    served = serve(url, "unused", target="examples.two_stage:app").start()
    await wait_for(lambda: "app started" in served.output() or not served.alive(), timeout=60, what="the app to start")
    assert served.alive(), served.output()
    feed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "examples/plain_clients.py", url],
        cwd=ROOT,
        env=served.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert feed.returncode == 0, feed.stderr
    assert feed.stdout.splitlines()[:3] == [
        "{'item': 'apple', 'total': 1.5}",
        "{'item': 'fig', 'total': 2.5}",
        "{'item': 'pear', 'total': 3.0}",
    ]
    assert await served.terminate() == 0
    if backend == "sqs":
        async with connected(url) as broker:
            for queue in ("orders.in", "orders.priced", "orders.out"):
                for name in (queue, broker.dead_letter_name(queue)):
                    await broker.delete_queue(name)


@pytest.mark.memory
def test_submit_without_a_real_broker_says_so_at_once() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSTREAM_")}
    done = subprocess.run(
        [TASKSTREAM, "submit", "classify", '"an abstract"', "--queue", "endpoint", "--wait"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "needs a real broker" in done.stderr and "TASKSTREAM_BROKER_URL" in done.stderr

"""What a newcomer runs from the README: the two-stage app served on each broker and fed by plain clients
(``examples/plain_clients.py``), and the CLI telling them when a command cannot work as typed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from taskstream.errors import QueueNotFound
from tests.e2e.conftest import ROOT, SQS_ENDPOINT, SQS_PREFIX, TASKSTREAM, Served, connected
from tests.support.waiting import wait_for

SHARED = {"rabbitmq": "amqp://guest:guest@127.0.0.1:5672/", "sqs": "", "azure": "azurequeue://devstorage"}
EXAMPLES = ROOT / "examples"
#: the example's queues: ``orders.in``, ``orders.priced``, ``orders.out`` (``orders-in`` ... for SQS and Azure)
ORDERS = re.compile(r"\borders(?=[.-](?:in|priced|out)\b)")


def with_queues_of_this_run(source: Path, stem: str, into: Path) -> Path:
    """``source`` written to ``into`` with the example's fixed ``orders.*`` queues renamed ``<stem>.*``.

    The examples name fixed queues (a newcomer's first run); on the shared servers two runs of this test would
    read each other's messages. The copy runs the example's code as it is, on queues of this run alone.
    """
    text, renamed = ORDERS.subn(stem, source.read_text(encoding="utf-8"))
    assert renamed and not re.search(r"orders[.-]", text), f"{source.name} still names a fixed orders queue"
    copy = into / source.name
    copy.write_text(text, encoding="utf-8")
    return copy


@pytest.mark.parametrize(
    "backend", [pytest.param(name, marks=getattr(pytest.mark, name), id=name) for name in ("rabbitmq", "sqs", "azure")]
)
async def test_readme_two_stage_app_fed_by_plain_clients(
    backend: str, serve: Callable[..., Served], tmp_path: Path
) -> None:
    url = SHARED[backend] or f"sqs://us-east-1/?endpoint_url={SQS_ENDPOINT}&queue_prefix={SQS_PREFIX}&wait_time=2"
    stem = f"orders{uuid.uuid4().hex[:8]}"
    code = tmp_path / "examples"
    code.mkdir()
    with_queues_of_this_run(EXAMPLES / "two_stage.py", stem, code)
    clients = with_queues_of_this_run(EXAMPLES / "plain_clients.py", stem, code)
    served = serve(url, "unused", target="two_stage:app")
    served.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), served.env.get("PYTHONPATH")]))
    served.start()
    try:
        await wait_for(
            lambda: "app started" in served.output() or not served.alive(), timeout=60, what="the app to start"
        )
        assert served.alive(), served.output()
        feed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(clients), url],
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
    finally:
        await served.terminate()
        async with connected(url) as broker:
            for queue in (f"{stem}.in", f"{stem}.priced", f"{stem}.out"):
                for name in (queue, broker.dead_letter_name(queue)):
                    with contextlib.suppress(QueueNotFound):
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

"""An app for ``taskstream queues --app tests.observe.cli_app:app``: one consumer queue and one task queue.

Its queue names start with ``TS_OBSERVE_PREFIX`` (``observe-app`` by default), so each test run uses its own.
"""

from __future__ import annotations

import os

from taskstream import App

PREFIX = os.environ.get("TS_OBSERVE_PREFIX", "observe-app")

app = App()


@app.consumer(f"{PREFIX}-orders", dead_letter=f"{PREFIX}-orders.dlq")
def handle(order: dict[str, int]) -> None:
    """Nothing to do: the test only lists the queues."""


@app.task(queue=f"{PREFIX}-tasks")
def double(n: int) -> int:
    return 2 * n

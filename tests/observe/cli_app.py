"""An app for ``taskstream queues --app tests.observe.cli_app:app``: one consumer queue and one task queue."""

from __future__ import annotations

from taskstream import App

app = App()


@app.consumer("observe-app-orders", dead_letter="observe-app-orders.dlq")
def handle(order: dict[str, int]) -> None:
    """Nothing to do: the test only lists the queues."""


@app.task(queue="observe-app-tasks")
def double(n: int) -> int:
    return 2 * n

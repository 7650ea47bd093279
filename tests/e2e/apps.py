"""Apps the end-to-end tests serve with ``taskstream run tests.e2e.apps:app``, configured by environment.

``E2E_QUEUE``
    the queue the ``record`` consumer reads; each body's ``n`` is appended to the file ``E2E_LOG`` (one line
    per run of the handler, so redeliveries show up as repeated lines).
``E2E_PUBLISH_TO``
    optional: ``record`` also publishes ``{"n": n, "seen_by": "taskstream"}`` there.
``E2E_DELAY``
    seconds each handler call sleeps (default 0.005), so a kill lands while work is in flight.
``E2E_TASK_QUEUE``
    the queue of the ``square`` task (``taskstream worker tests.e2e.apps:app``); each run is logged like
    ``record``'s.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from taskstream import App

app = App()


class Item(BaseModel):
    n: int


@app.consumer(
    os.environ.get("E2E_QUEUE", "e2e.records"),
    publish_to=os.environ.get("E2E_PUBLISH_TO") or None,
    concurrency=4,
)
def record(item: Item) -> dict[str, object] | None:
    """Write ``n`` to the log file (flushed before the handler returns, so before the ack)."""
    time.sleep(float(os.environ.get("E2E_DELAY", "0.005")))
    with open(os.environ["E2E_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{item.n}\n")
    if os.environ.get("E2E_PUBLISH_TO"):
        return {"n": item.n, "seen_by": "taskstream"}
    return None


@app.task(queue=os.environ.get("E2E_TASK_QUEUE", "e2e.tasks"))
def square(n: int) -> int:
    """A task: log ``n`` (before the result is stored and the message acked), return its square."""
    time.sleep(float(os.environ.get("E2E_DELAY", "0.005")))
    with open(os.environ["E2E_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{n}\n")
    return n * n

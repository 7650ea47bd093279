"""An App for the CLI tests: ``taskstream worker tests.tasks.cli_app:app`` (broker and store from the environment)."""

from __future__ import annotations

import os

from taskstream import App
from tests.tasks import library

QUEUE = os.environ.get("TS_TEST_QUEUE", "tasks")

app = App()
app.on_startup(scope="processes")(library.load_model)
app.task(queue=QUEUE)(library.add)
app.task(queue=QUEUE)(library.fail)
app.task(queue=QUEUE, cpu_bound=True)(library.pi)
app.task(queue=QUEUE, cpu_bound=True)(library.model_info)

"""The task client's reply listener, fed hostile bodies on its reply queue by a plain client.

What it cannot read belongs in the shared reply dead-letter queue (:func:`taskstream.intake.reply_dead_letter_queue`)
with the reason, and the results behind them still resolve their futures.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from taskstream.app import App
from taskstream.intake import reply_dead_letter_queue
from taskstream.settings import Settings
from tests.hostile.conftest import PATIENCE, VALID, Backend, Hostile, assert_reasons, common_bodies, envelope


@pytest.mark.parametrize(
    "backend",
    [pytest.param(name, marks=getattr(pytest.mark, name)) for name in ("memory", "rabbitmq")],
    indirect=True,
)
async def test_unreadable_task_replies_are_dead_lettered_and_results_behind_them_resolve(backend: Backend) -> None:
    store = "memory://" if backend.name == "memory" else f"sqlite:///{backend.tmp_path / 'results.sqlite3'}"
    settings = Settings(shutdown_grace=2.0, concurrency=4)
    app = App(broker=backend.reader_broker(), settings=settings, workers=True, result_store=store)
    queue = backend.queue("task-replies")

    @app.task(queue=queue, name=f"hostile_triple_{uuid.uuid4().hex[:6]}")
    def triple(n: int) -> int:
        return 3 * n

    hostile = [
        *common_bodies(),
        Hostile("wrong-types", envelope(kind="result", id=5, headers=[1], body={}), "broken taskstream envelope"),
        Hostile("correlation-a-number", envelope(kind="result", id="r1", correlation_id=7, body={}), "correlation_id"),
    ]
    async with app:
        await app.tasks.client.ensure_started()
        reply_queue = app.tasks.client.reply_queue
        for item in hostile:
            await backend.send(reply_queue, item.body)
        futures = [triple.submit(i) for i in range(VALID)]
        async with asyncio.timeout(PATIENCE):
            results = [await future for future in futures]
        assert results == [3 * i for i in range(VALID)]
        found = await backend.dead_letters(
            reply_dead_letter_queue(app.broker), hostile, original_queue=reply_queue, patience=3.0
        )
    assert_reasons(found, hostile, reply_queue)

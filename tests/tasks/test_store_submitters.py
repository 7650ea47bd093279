"""Result stores remember who submitted a task: reply_to in every store, claims and refusals that respect it."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from taskstream.tasks.stores.base import ResultStore, TaskInfo, result_store_from_url
from taskstream.tasks.stores.memory import MemoryResultStore
from taskstream.tasks.stores.sqlite import SQLiteResultStore

REDIS_URL = "redis://127.0.0.1:6379/15"

MakeStore = Callable[[], ResultStore]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    made: list[ResultStore] = []

    def make() -> ResultStore:
        if request.param == "memory":
            store: ResultStore = MemoryResultStore()
        elif request.param == "sqlite":
            store = result_store_from_url(f"sqlite:///{tmp_path / 'r.sqlite3'}")
        else:
            store = result_store_from_url(REDIS_URL)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def _id() -> str:
    return uuid.uuid4().hex


def _refusal(task_id: str, reply_to: str, name: str = "") -> TaskInfo:
    error = {"type": "taskstream.tasks.errors.TaskRefused", "message": "refused", "traceback": ""}
    return TaskInfo(task_id, name=name, status="failed", finished_at=5.0, worker="w:9", error=error, reply_to=reply_to)


async def test_every_store_keeps_the_submitting_reply_queue(make_store: MakeStore) -> None:
    store = make_store()
    pending, claimed, finished = _id(), _id(), _id()
    await store.add_pending([TaskInfo(pending, name="pi", queue="q", submitted_at=1.0, reply_to="reply-a")])
    assert store.get(pending).reply_to == "reply-a"  # type: ignore[union-attr]
    assert await store.claim(claimed, name="pi", queue="q", worker="w:1", started_at=2.0, reply_to="reply-b") is None
    assert store.get(claimed).reply_to == "reply-b"  # type: ignore[union-attr]
    await store.finish(TaskInfo(finished, name="pi", status="success", result=3, reply_to="reply-c"))
    assert store.get(finished).reply_to == "reply-c"  # type: ignore[union-attr]
    assert store.get(finished).as_dict()["reply_to"] == "reply-c"  # type: ignore[union-attr]


async def test_a_claim_from_another_reply_queue_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    task_id = _id()
    await store.add_pending([TaskInfo(task_id, name="pi", queue="q", submitted_at=1.0, reply_to="reply-a")])
    blocker = await store.claim(task_id, name="pi", queue="q", worker="w:1", started_at=2.0, reply_to="reply-x")
    assert blocker is not None and blocker.status == "pending" and blocker.reply_to == "reply-a"
    assert await store.claim(task_id, name="pi", queue="q", worker="w:1", started_at=2.0, reply_to="reply-a") is None
    record = store.get(task_id)
    assert record is not None and record.status == "running" and record.attempts == 1


async def test_a_refusal_never_overwrites_a_final_or_foreign_record(make_store: MakeStore) -> None:
    store = make_store()
    done, foreign, running, unknown = _id(), _id(), _id(), _id()
    await store.finish(TaskInfo(done, name="pi", status="success", result=42, reply_to="reply-a"))
    assert not await store.record_refusal(_refusal(done, "reply-a"))
    assert not await store.record_refusal(_refusal(done, "reply-x"))
    kept = store.get(done)
    assert kept is not None and kept.status == "success" and kept.result == 42
    assert store.try_cancel(foreign) and not await store.record_refusal(_refusal(foreign, ""))
    assert store.get(foreign).status == "cancelled"  # type: ignore[union-attr]

    await store.add_pending([TaskInfo(running, name="pi", queue="q", submitted_at=1.0, reply_to="reply-a")])
    assert await store.claim(running, name="pi", queue="q", worker="w:1", started_at=2.0, reply_to="reply-a") is None
    assert not await store.record_refusal(_refusal(running, "reply-x"))
    assert store.get(running).status == "running"  # type: ignore[union-attr]
    assert await store.record_refusal(_refusal(running, "reply-a"))
    refused = store.get(running)
    assert refused is not None and refused.status == "failed" and refused.error is not None
    assert refused.name == "pi" and refused.attempts == 1 and refused.queue == "q"  # the rest is kept

    assert await store.record_refusal(_refusal(unknown, "reply-b", name="nope"))
    new = store.get(unknown)
    assert new is not None and new.status == "failed" and new.name == "nope" and new.reply_to == "reply-b"


_OLD_SCHEMA = """
CREATE TABLE taskstream_tasks (
    task_id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', queue TEXT NOT NULL DEFAULT '', status TEXT NOT NULL,
    submitted_at REAL, started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '', result BLOB, error BLOB, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX taskstream_tasks_expiry ON taskstream_tasks(expires_at);
INSERT INTO taskstream_tasks (task_id, name, status, result, expires_at) VALUES ('old', 'pi', 'success', '3', 4e9);
"""


async def test_a_sqlite_file_from_before_reply_to_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(_OLD_SCHEMA)
    conn.close()
    first, second = SQLiteResultStore(path), SQLiteResultStore(path)  # both open it; the column is added once
    try:
        old = first.get("old")
        assert old is not None and old.status == "success" and old.result == 3 and old.reply_to == ""
        task_id = _id()
        assert await second.claim(task_id, name="pi", queue="q", worker="w", started_at=1.0, reply_to="r") is None
        assert first.get(task_id).reply_to == "r"  # type: ignore[union-attr]
    finally:
        await first.close()
        await second.close()

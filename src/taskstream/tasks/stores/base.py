"""The result store protocol: task status and results by id, for any client.

A store keeps one :class:`TaskInfo` per task id. Three writers touch it:

* the submitting client records ``pending`` (``add_pending``; never overwrites a newer state),
* the worker *claims* the task before running it (``claim``: ``pending``/``running`` -> ``running``,
  atomically, so a cancelled or finished task is never run again),
* the worker records the outcome (``finish``: ``success``/``failed``, or ``pending`` again before a retry),
  or a refusal (``record_refusal``: never over a final record, nor over another submitter's record).

Each record names the reply queue that submitted it (``reply_to``; empty for fire-and-forget calls and
records written before the field existed). ``claim`` refuses a message whose ``reply_to`` differs from a
record's non-empty one, so a reused task id never runs over, or is answered with, another client's task.

``try_cancel`` flips ``pending`` (or an unknown id) to ``cancelled`` atomically and says whether it did.

The hot-path writes are async (backends batch them); ``get`` and ``try_cancel`` are plain calls usable from
any thread, without an event loop (a notebook, another process, the CLI). Every record expires
``ttl`` seconds after its last write.

=====================  ======================================================  ===========================
URL                    Store                                                   Scope
=====================  ======================================================  ===========================
``memory://[name]``    dict in this process (shared by name)                   one process
``sqlite:///rel.db``   SQLite file, WAL mode; ``sqlite:////abs/path.db``;      one host, many processes
                       ``?synchronous=full`` to fsync every commit
``redis://h:p/db``     Redis hashes with EXPIRE, Lua for claim/cancel          many hosts
=====================  ======================================================  ===========================
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from taskstream.errors import ConfigurationError
from taskstream.schemes import Backend, load_backend
from taskstream.settings import redact_url

__all__ = [
    "DEFAULT_SQLITE_PATH",
    "FINAL_STATES",
    "ResultStore",
    "Status",
    "TaskInfo",
    "default_sqlite_path",
    "result_store_from_url",
]

Status = Literal["pending", "running", "success", "failed", "cancelled"]
FINAL_STATES: frozenset[str] = frozenset({"success", "failed", "cancelled"})


def default_sqlite_path() -> Path:
    """``$XDG_CACHE_HOME/taskstream/results.sqlite3`` (``~/.cache/...`` when unset): shared by one host's users."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskstream" / "results.sqlite3"


DEFAULT_SQLITE_PATH = default_sqlite_path()


@dataclass(slots=True)
class TaskInfo:
    """What a store knows about one task.

    Attributes:
        task_id: the id ``submit`` returned (``TaskFuture.task_id``).
        name: registered task name.
        queue: queue it was sent to.
        status: ``pending``, ``running``, ``success``, ``failed`` or ``cancelled``.
        submitted_at / started_at / finished_at: Unix times (``None`` until known).
        attempts: deliveries that started running it.
        worker: ``host:pid`` of the worker that ran it last.
        result: the return value (JSON-compatible, as it travelled) once ``success``.
        error: ``{"type", "message", "traceback"}`` once ``failed`` (or the last error before a retry).
        expires_at: when the store forgets it.
        reply_to: the reply queue of the client that submitted it (``""``: none, or unknown).
    """

    task_id: str
    name: str = ""
    queue: str = ""
    status: Status = "pending"
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str = ""
    result: Any = None
    error: dict[str, str] | None = None
    expires_at: float | None = None
    reply_to: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True once the task succeeded, failed or was cancelled."""
        return self.status in FINAL_STATES

    def outcome(self) -> Any:
        """The result of a successful task; raises the rebuilt remote error of a failed one.

        Raises:
            TaskError: (a subclass of it) when the task failed.
            concurrent.futures.CancelledError: when it was cancelled.
            RuntimeError: when it has not finished yet.
        """
        import concurrent.futures

        from taskstream.tasks.errors import error_from_data

        if self.status == "success":
            return self.result
        if self.status == "failed":
            raise error_from_data(self.error, task=self.name)
        if self.status == "cancelled":
            raise concurrent.futures.CancelledError(f"task {self.task_id} was cancelled")
        raise RuntimeError(f"task {self.task_id} is still {self.status}")

    def with_ttl(self, ttl: float, now: float | None = None) -> TaskInfo:
        """A copy that expires ``ttl`` seconds after ``now``."""
        return replace(self, expires_at=(now or time.time()) + ttl)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for printing and the CLI)."""
        return {
            "task_id": self.task_id,
            "name": self.name,
            "queue": self.queue,
            "status": self.status,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "attempts": self.attempts,
            "worker": self.worker,
            "result": self.result,
            "error": self.error,
            "expires_at": self.expires_at,
            "reply_to": self.reply_to,
        }


class ResultStore(abc.ABC):
    """Where task status and results live. See the module docstring for who writes what."""

    url: str = ""
    ttl: float = 86400.0

    @abc.abstractmethod
    async def add_pending(self, records: Sequence[TaskInfo]) -> None:
        """Record newly submitted tasks; a record that already exists (claimed, cancelled) is left alone."""

    @abc.abstractmethod
    async def claim(
        self, task_id: str, *, name: str, queue: str, worker: str, started_at: float, reply_to: str = ""
    ) -> TaskInfo | None:
        """Mark the task ``running`` if it is pending, running (a redelivery) or unknown.

        A record whose ``reply_to`` is set and differs from ``reply_to`` is never claimed (a reused id).

        Returns:
            ``None`` when the caller may run the task; otherwise the record that forbids it
            (``cancelled``, already ``success``/``failed``: a duplicate delivery, or another submitter's).
        """

    @abc.abstractmethod
    async def finish(self, info: TaskInfo) -> None:
        """Write the outcome (or ``pending`` before a retry), replacing the record."""

    @abc.abstractmethod
    async def record_refusal(self, info: TaskInfo) -> bool:
        """Record a refused task (``info.status == "failed"``) unless that would overwrite something.

        Nothing is written over a final record (``success``, ``failed``, ``cancelled``) nor over a record
        whose non-empty ``reply_to`` differs from ``info.reply_to`` (another submitter's task). Over a pending
        or running record of the same submitter, the status, ``finished_at``, ``worker`` and ``error`` are
        replaced and the rest is kept.

        Returns:
            Whether the refusal was written.
        """

    @abc.abstractmethod
    def get(self, task_id: str) -> TaskInfo | None:
        """The record of ``task_id``, or ``None`` if unknown or expired. Callable from any thread."""

    @abc.abstractmethod
    def try_cancel(self, task_id: str) -> bool:
        """Mark a pending (or unknown) task ``cancelled``; ``False`` if it is running or finished."""

    @classmethod
    def from_url(cls, url: str, *, ttl: float = 86400.0) -> ResultStore:
        """Build the store from its URL (:func:`result_store_from_url` picks the class by scheme).

        A store of your own need not have one: pass it to the App as an instance.

        Raises:
            ConfigurationError: an unknown option or a URL this store cannot use.
        """
        raise ConfigurationError(f"{cls.__name__} is not built from a URL: pass an instance")

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)!r}>"


_REDIS = Backend("taskstream.tasks.stores.redis:RedisResultStore", "Redis result store", "redis", "redis", "redis")
#: URL scheme -> the store class (imported on first use) and the extra its client library comes with.
_STORES: dict[str, Backend] = {
    "memory": Backend("taskstream.tasks.stores.memory:MemoryResultStore", "memory result store"),
    "sqlite": Backend("taskstream.tasks.stores.sqlite:SQLiteResultStore", "SQLite result store"),
    "redis": _REDIS,
    "rediss": _REDIS,
}


def result_store_from_url(url: str, *, ttl: float = 86400.0) -> ResultStore:
    """Build the store for ``url`` (see the module table); the scheme picks the class, its ``from_url`` the rest.

    Example:
        >>> result_store_from_url("memory://").get("no-such-task") is None
        True

    Raises:
        ConfigurationError: ``ttl`` not positive, unknown scheme (with a "did you mean") or option, or an unusable
            URL; the message shows the URL without secrets.
        MissingExtraError: ``redis://`` without the ``redis`` package; the message names the ``pip install``.
    """
    if ttl <= 0:
        raise ConfigurationError(f"result_ttl must be positive, got {ttl}")
    cls: type[ResultStore] = load_backend(_STORES, url, what="result store", base=ResultStore)
    return cls.from_url(url, ttl=ttl)

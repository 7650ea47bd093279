"""Errors of task futures, under :class:`taskstream.errors.TaskError`.

The branch of the tree that lives here::

    TaskstreamError
    ├── TaskError                 a task failed remotely (remote type, message, traceback)
    │   ├── TaskTimeout           it ran longer than its ``timeout``
    │   ├── DependencyFailed      an input future of a dataflow edge failed or was cancelled
    │   ├── TaskRefused           the worker would not run it (unknown name, unsigned code, bad request)
    │   ├── WorkerLost            the worker process running it died (crash, OOM kill)
    │   └── <RemoteXxx>           generated subclasses that also derive from the remote *builtin* type,
    │                             so ``except ZeroDivisionError`` catches a remote ZeroDivisionError
    ├── TaskNotFound              no record of that task id (never submitted, or its record expired)
    └── ResultStoreError          the result store (SQLite, Redis) failed; the driver error is chained

Remote errors are rebuilt from plain data (type name, message, traceback text); nothing is unpickled and
no module is imported by name from the wire: only builtin exception types become extra bases.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import functools
import os
import traceback
from types import TracebackType
from typing import Any

from taskstream.errors import TaskError, TaskstreamError

__all__ = [
    "DependencyFailed",
    "ResultStoreError",
    "TaskNotFound",
    "TaskRefused",
    "TaskTimeout",
    "WorkerLost",
    "error_from_data",
    "error_to_data",
]


class TaskTimeout(TaskError):
    """A task ran longer than its ``timeout`` (see :mod:`taskstream.tasks` for kill-or-abandon rules)."""


class DependencyFailed(TaskError):
    """A future passed as an argument failed or was cancelled, so the dependent task never ran.

    The input's own exception is chained as ``__cause__``.
    """


class TaskRefused(TaskError):
    """A worker refused the task: unknown name, unsigned or badly signed code, or a malformed request."""


class WorkerLost(TaskError):
    """The worker process running the task died before answering (a crash, an OOM kill)."""


class TaskNotFound(TaskstreamError):
    """No record of a task id in the result store (never submitted here, or expired after ``result_ttl``)."""


class ResultStoreError(TaskstreamError):
    """The result store failed (locked database, lost Redis connection); the driver error is ``__cause__``."""


def error_to_data(exc: BaseException) -> dict[str, str]:
    """Describe an exception as plain data for the wire: type, message, formatted traceback."""
    if isinstance(exc, TaskError) and exc.remote_type:
        kind = exc.remote_type
        message = str(getattr(exc, "remote_message", "") or exc.remote_type)
        tb = exc.remote_traceback
    else:
        kind = type(exc).__qualname__
        if type(exc).__module__ not in ("builtins", "__main__"):
            kind = f"{type(exc).__module__}.{kind}"
        message = str(exc)
        tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    return {"type": kind, "message": message, "traceback": tb}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_MACHINERY = tuple(
    os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep for m in (asyncio, concurrent.futures)
)


def _internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR + os.sep) or filename.startswith(_STDLIB_MACHINERY)


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame outside the task machinery (all of it if every frame is ours)."""
    first = tb
    while tb is not None and _internal(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb if tb is not None else first


_OWN = {cls.__name__: cls for cls in (TaskTimeout, DependencyFailed, TaskRefused, WorkerLost)}


@functools.cache
def _remote_class(type_name: str) -> type[TaskError]:
    """``TaskError`` or a subclass that also derives from the builtin exception called ``type_name``."""
    short = type_name.rsplit(".", 1)[-1]
    if short in _OWN and type_name.startswith("taskstream."):
        return _OWN[short]
    builtin = getattr(builtins, type_name, None)
    if (
        isinstance(builtin, type)
        and issubclass(builtin, Exception)
        and not issubclass(builtin, (StopIteration, StopAsyncIteration))
    ):
        try:
            cls = type(
                f"Remote{type_name}",
                (TaskError, builtin),
                {"__str__": BaseException.__str__, "__module__": __name__, "__init__": TaskError.__init__},
            )
        except TypeError:  # incompatible instance layout
            return TaskError
        return cls
    return TaskError


def error_from_data(data: Any, *, task: str = "") -> TaskError:
    """Rebuild a remote error from :func:`error_to_data` output (tolerating missing fields)."""
    if not isinstance(data, dict):
        data = {"type": "", "message": str(data), "traceback": ""}
    type_name = str(data.get("type") or "")
    message = str(data.get("message") or "")
    if task:
        message = f"{message} (in task {task})" if message else f"(in task {task})"
    cls = _remote_class(type_name)
    error = cls(message, remote_type=type_name, remote_traceback=str(data.get("traceback") or ""))
    error.remote_message = message  # type: ignore[attr-defined]
    return error

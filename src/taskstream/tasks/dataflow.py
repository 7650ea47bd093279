"""Dataflow edges: futures passed as arguments (also inside lists, tuples and dicts) become dependencies.

``submit`` looks for futures in the arguments. A task with dependencies is held by the submitting client and
dispatched only when every input finished; the inputs' results replace the futures in the arguments. If an
input failed or was cancelled, the dependent task never runs: its future fails with
:class:`~taskstream.tasks.errors.DependencyFailed`, whose ``__cause__`` is the input's error, and a chain of
dependents fails the same way, each naming its failed input.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from taskstream.tasks.errors import DependencyFailed

__all__ = ["dependency_error", "find_futures", "resolve_futures"]

_WALKED = (list, tuple, dict, concurrent.futures.Future)


def find_futures(
    value: Any, found: list[concurrent.futures.Future[Any]] | None = None
) -> list[concurrent.futures.Future[Any]]:
    """Every future inside ``value`` (walking lists, tuples and dict values), in order, without repeats."""
    found = [] if found is None else found
    if isinstance(value, concurrent.futures.Future):
        if not any(f is value for f in found):
            found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, _WALKED):
                find_futures(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, _WALKED):
                find_futures(item, found)
    return found


def resolve_futures(value: Any) -> Any:
    """A copy of ``value`` with every (finished) future replaced by its result."""
    if isinstance(value, concurrent.futures.Future):
        return value.result(0)
    if isinstance(value, dict):
        return {k: resolve_futures(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_futures(v) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve_futures(v) for v in value)
    return value


def dependency_error(task: str, futures: list[concurrent.futures.Future[Any]]) -> DependencyFailed | None:
    """The error for ``task`` if one of its (finished) inputs failed or was cancelled, else ``None``."""
    for position, future in enumerate(futures):
        label = _describe(future, position)
        if future.cancelled():
            error = DependencyFailed(f"task {task} did not run: its input {label} was cancelled")
            error.__cause__ = concurrent.futures.CancelledError(label)
            return error
        cause = future.exception(0)
        if cause is not None:
            first_line = str(cause).split("\n", 1)[0]
            error = DependencyFailed(f"task {task} did not run: its input {label} failed: {first_line}")
            error.__cause__ = cause
            return error
    return None


def _describe(future: concurrent.futures.Future[Any], position: int) -> str:
    name = getattr(future, "name", None)
    task_id = getattr(future, "task_id", None)
    if name and task_id:
        return f"{name} ({task_id})"
    return f"#{position} ({type(future).__name__})"

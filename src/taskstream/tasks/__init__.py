"""Task futures: funcX-style endpoints and Parsl-style dataflow over any broker.

Example:
    >>> import taskstream
    >>> app = taskstream.App()          # memory broker: workers run inside this program
    >>> @app.task
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> with app:
    ...     total = add.submit(add.submit(1, 2), 4)   # a future as an argument is a dataflow edge
    ...     total.result(timeout=10)
    7

Pieces, one module each: :mod:`.registry` (``@app.task``, ``Task.submit``/``map``), :mod:`.future`
(``TaskFuture``, ``gather``, ``as_completed``), :mod:`.dataflow`, :mod:`.client` (reply queue),
:mod:`.worker` (execution, retries, timeouts), :mod:`.pool` (worker processes, autoscale),
:mod:`.stores` (memory, SQLite, Redis), :mod:`.protocol` (wire format, signed code), :mod:`.cli`.
"""

from taskstream.tasks.errors import DependencyFailed, TaskNotFound, TaskRefused, TaskTimeout, WorkerLost
from taskstream.tasks.future import AsCompleted, GatheredFuture, TaskFuture, as_completed, gather
from taskstream.tasks.registry import DEFAULT_TASK_QUEUE, Task, TaskOptions
from taskstream.tasks.stores.base import ResultStore, TaskInfo, result_store_from_url
from taskstream.tasks.worker import WorkerConfig

__all__ = [
    "DEFAULT_TASK_QUEUE",
    "AsCompleted",
    "DependencyFailed",
    "GatheredFuture",
    "ResultStore",
    "Task",
    "TaskFuture",
    "TaskInfo",
    "TaskNotFound",
    "TaskOptions",
    "TaskRefused",
    "TaskTimeout",
    "WorkerConfig",
    "WorkerLost",
    "as_completed",
    "gather",
    "result_store_from_url",
]

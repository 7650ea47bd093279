"""``@app.task``: the task registry, task options and the ``Task`` handle with ``submit`` and ``map``.

Workers find functions by *name* in the App's registry (the function's ``__name__`` unless ``name=`` is
given), so the same module imported by a client script and by ``taskstream worker`` agrees on names
whether it runs as ``__main__`` or as ``examples.endpoint``. No code travels unless ``ship_code=True``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypedDict, TypeVar

from taskstream.errors import ConfigurationError
from taskstream.tasks.protocol import ShippedCode, function_source

if TYPE_CHECKING:
    from taskstream.tasks.future import TaskFuture

__all__ = ["DEFAULT_TASK_QUEUE", "Submitter", "Task", "TaskOptions", "TaskParams", "function_ref", "task_options"]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_TASK_QUEUE = "tasks"
MAX_RETRIES = 100
DEFAULT_RETRY_DELAY = 0.5


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task is sent and run.

    Attributes:
        queue: the queue its calls go to (a worker serves one or more queues).
        retries: times a failing call is retried (requeued with backoff) before it fails for good.
        retry_delay: first retry delay in seconds; doubles each retry, at most 60 s.
        timeout: seconds a call may run on a worker; ``None`` for no limit. What happens at the limit
            depends on how it runs (see :mod:`taskstream.tasks`): async calls are cancelled, calls in
            worker processes are killed, sync calls on threads are abandoned.
        cpu_bound: run in a worker process (one core per call) instead of a thread.
        ship_code: send the function's source with each call; the client signs each call (the whole request,
            with an expiry) with ``settings.signing_key`` (see :mod:`taskstream.tasks.protocol`).
    """

    queue: str = DEFAULT_TASK_QUEUE
    retries: int = 0
    retry_delay: float = DEFAULT_RETRY_DELAY
    timeout: float | None = None
    cpu_bound: bool = False
    ship_code: bool = False

    def validated(self) -> TaskOptions:
        """Self, or a clear :class:`ConfigurationError` naming the bad option."""
        if not self.queue:
            raise ConfigurationError("task queue name must not be empty")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ConfigurationError(f"retries must be between 0 and {MAX_RETRIES}, got {self.retries}")
        if self.retry_delay < 0:
            raise ConfigurationError(f"retry_delay must not be negative, got {self.retry_delay}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigurationError(f"timeout must be positive (or None), got {self.timeout}")
        return self


class TaskParams(TypedDict, total=False):
    """The keywords of ``@app.task(...)``, declared once: ``name`` (default: the function's ``__name__``) and
    the fields of :class:`TaskOptions` (one left out keeps its default)."""

    name: str | None
    queue: str
    retries: int
    retry_delay: float
    timeout: float | None
    cpu_bound: bool
    ship_code: bool


def task_options(params: TaskParams) -> tuple[str | None, TaskOptions]:
    """``(name, options)`` from the keywords of ``@app.task(...)``, checked.

    Raises:
        TypeError: a keyword ``@app.task`` does not take (named, with the ones it does).
        ConfigurationError: an option out of range (see :meth:`TaskOptions.validated`).
    """
    known = TaskParams.__annotations__
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        raise TypeError(
            f"@app.task got unexpected keyword argument(s) {', '.join(unknown)} (it takes: {', '.join(sorted(known))})"
        )
    values: dict[str, Any] = dict(params)
    name: str | None = values.pop("name", None)
    return name, replace(TaskOptions(), **values).validated()


class Submitter(Protocol):
    """What a Task needs from its runtime."""

    def submit_calls(
        self, task: Task[Any, Any], calls: Sequence[tuple[Sequence[Any], dict[str, Any]]], chunksize: int
    ) -> list[TaskFuture[Any]]: ...

    def signing_key(self) -> bytes | None: ...


def function_ref(func: Callable[..., Any]) -> tuple[str, str] | None:
    """``(module, qualname)`` by which another process can import ``func``; ``None`` if it cannot."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        return None
    return module, qualname


class Task(Generic[P, R]):
    """A registered task: call it locally like the function, or ``submit``/``map`` it to workers.

    Example:
        >>> # @app.task(cpu_bound=True)
        >>> # def pi(n: int) -> float: ...
        >>> # fut = pi.submit(10**6); fut.result()
    """

    def __init__(
        self,
        submitter: Submitter,
        name: str,
        func: Callable[P, Any] | None,
        options: TaskOptions,
    ) -> None:
        self._submitter = submitter
        self.name = name
        self.func = func
        self.options = options.validated()
        self.is_async = func is not None and inspect.iscoroutinefunction(func)
        self.ref = function_ref(func) if func is not None else None
        self.code: ShippedCode | None = None
        self.__taskstream_func__ = func
        if func is not None:
            functools.update_wrapper(self, func)
        if options.cpu_bound and func is not None and self.ref is None:
            raise ConfigurationError(
                f"cpu_bound task {func.__qualname__} runs in worker processes, which import it by name: "
                "define it at module level"
            )
        if options.ship_code:
            if func is None:
                raise ConfigurationError(f"ship_code needs the function itself; {name!r} is only a name here")
            key = submitter.signing_key()
            if key is None:
                raise ConfigurationError(
                    f"ship_code=True for {name!r} needs a signing key: set TASKSTREAM_SIGNING_KEY "
                    "(or Settings(signing_key=...)) on the client and on the workers"
                )
            code_name, source = function_source(func)
            self.code = ShippedCode(name=code_name, source=source)  # each submission is signed by the client

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now (no broker); an async task returns its coroutine."""
        if self.func is None:
            raise TypeError(f"task {self.name!r} is only known by name here; use .submit(...)")
        result: R = self.func(*args, **kwargs)
        return result

    def submit(self, *args: Any, **kwargs: Any) -> TaskFuture[R]:
        """Send one call to the workers; returns a :class:`TaskFuture` at once.

        Futures among the arguments (also inside lists, tuples and dict values) are dataflow inputs: the
        call is sent only when they finished, with their results in their place.
        """
        return self._submitter.submit_calls(self, [(args, kwargs)], 1)[0]

    def map(self, *iterables: Iterable[Any], chunksize: int = 1) -> list[TaskFuture[R]]:
        """Submit one call per item (``zip`` of several iterables gives positional arguments), in one batch.

        With ``chunksize > 1`` every ``chunksize`` items travel and run as one message (fewer round trips for
        small calls); each item still gets its own future, and a chunk's items share its task id. Retries
        of a chunked item happen in place, at once, on the same worker.
        """
        if chunksize < 1:
            raise ConfigurationError(f"chunksize must be at least 1, got {chunksize}")
        calls: list[tuple[Sequence[Any], dict[str, Any]]] = [(args, {}) for args in zip(*iterables, strict=False)]
        return self._submitter.submit_calls(self, calls, chunksize)

    def with_options(self, **changes: Any) -> Task[P, R]:
        """The same task under other options (``queue=``, ``timeout=``, ``retries=`` ...), e.g. another queue."""
        return Task(self._submitter, self.name, self.func, replace(self.options, **changes))

    def request_body(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        items: Sequence[tuple[Sequence[Any], dict[str, Any]]] | None = None,
    ) -> dict[str, Any]:
        """The task message body (see :mod:`taskstream.tasks.protocol`); shipped code is not signed yet."""
        opts = self.options
        body: dict[str, Any] = {"task": self.name, "retries": opts.retries}
        if items is None:
            body["args"] = args
            body["kwargs"] = kwargs
        else:
            body["items"] = [[list(a), k] for a, k in items]
        if opts.timeout is not None:
            body["timeout"] = opts.timeout
        if opts.retry_delay != DEFAULT_RETRY_DELAY:
            body["retry_delay"] = opts.retry_delay
        if self.code is not None:
            body["code"] = {"name": self.code.name, "source": self.code.source}
            body["cpu_bound"] = opts.cpu_bound
        return body

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue!r}>"


def chunked(calls: Sequence[Any], size: int) -> Iterable[list[Any]]:
    """Split ``calls`` into lists of at most ``size``."""
    iterator = iter(calls)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk

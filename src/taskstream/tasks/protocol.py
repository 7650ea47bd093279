"""What task and result messages look like on the wire, and signed code shipping.

A task is an :class:`~taskstream.messages.Envelope` with ``kind="task"``, ``id`` = task id,
``reply_to`` = the submitting client's reply queue, and this body::

    {"task": "pi", "args": [1000000], "kwargs": {},
     "retries": 0, "timeout": null, "cpu_bound": true,       # options; the worker's registry fills gaps
     "items": [[[1], {}], [[2], {}]],                         # only for map chunks: one call per item
     "code": {"name": "pi", "source": "def pi(n): ...", "sig": "<hex HMAC-SHA256>"}}   # only when shipped

A result is an envelope with ``kind="result"``, ``correlation_id`` = task id and the body::

    {"task_id": "...", "status": "success" | "failed" | "cancelled", "result": <value>,
     "error": {"type": "ZeroDivisionError", "message": "...", "traceback": "..."},
     "started_at": 1.7e9, "finished_at": 1.7e9, "worker": "host:pid", "attempts": 1}

For a map chunk ``result`` is a list with one ``{"ok": value}`` or ``{"error": {...}}`` per item.

Code shipping (opt-in, ``@app.task(ship_code=True)``): the client sends the function's source with an
HMAC-SHA256 signature made with ``settings.signing_key``. A worker runs shipped code only when its own key
verifies the signature; unsigned code, a bad signature, or a worker with no key is refused (the client gets
:class:`~taskstream.tasks.errors.TaskRefused` and the message is dead-lettered with the reason). Nothing is
ever unpickled. A shipped function must be self-contained (imports inside its body), as with funcX.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import hmac
import inspect
import itertools
import os
import secrets
import textwrap
import threading
from collections.abc import Callable
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from taskstream.errors import ConfigurationError
from taskstream.tasks.errors import TaskRefused

__all__ = [
    "ShippedCode",
    "new_task_id",
    "TaskRequest",
    "function_source",
    "load_shipped",
    "sign_code",
    "verify_code",
]

_SIGNING_DOMAIN = b"taskstream-code-v1\x00"

_ID_PREFIX: tuple[int, str] = (0, "")
_ID_COUNTER = itertools.count()


def new_task_id() -> str:
    """A new task id: 32 hex characters, 80 random bits per process plus a counter.

    As unique as a UUID4 in practice, without a ``getrandom`` system call per task.
    """
    global _ID_PREFIX
    pid = os.getpid()
    if _ID_PREFIX[0] != pid:  # first use, or a forked child
        _ID_PREFIX = (pid, secrets.token_hex(10))
    return f"{_ID_PREFIX[1]}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


class ShippedCode(BaseModel):
    """A function's source and its signature."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    sig: str = ""


class TaskRequest(BaseModel):
    """The body of a task message."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    task: str = Field(min_length=1)
    args: list[Any] = Field(default_factory=list)
    call_kwargs: dict[str, Any] = Field(default_factory=dict, alias="kwargs")
    retries: int | None = Field(default=None, ge=0)
    retry_delay: float | None = Field(default=None, ge=0)
    timeout: float | None = Field(default=None, gt=0)
    cpu_bound: bool | None = None
    items: list[tuple[list[Any], dict[str, Any]]] | None = None
    code: ShippedCode | None = None


def function_source(func: Callable[..., Any]) -> tuple[str, str]:
    """``(name, source)`` of a plain module- or notebook-level function, decorators stripped.

    Raises:
        ConfigurationError: the source is unavailable (a builtin, a lambda, code typed into a REPL).
    """
    try:
        raw = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError) as exc:
        raise ConfigurationError(f"cannot ship {func.__qualname__}: its source is not available ({exc})") from exc
    tree = ast.parse(raw)
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if not defs:
        raise ConfigurationError(f"cannot ship {func.__qualname__}: it is not a def (lambdas cannot be shipped)")
    node = defs[0]
    node.decorator_list = []
    return node.name, ast.unparse(node)


def sign_code(key: bytes, task: str, code_name: str, source: str) -> str:
    """HMAC-SHA256 over the task name, the function name and the source, as hex."""
    payload = _SIGNING_DOMAIN + task.encode() + b"\x00" + code_name.encode() + b"\x00" + source.encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify_code(key: bytes | None, task: str, code: ShippedCode) -> None:
    """Raise :class:`TaskRefused` unless ``code`` carries a valid signature under ``key``."""
    if key is None:
        raise TaskRefused(
            f"refusing shipped code for task {task!r}: this worker has no signing key "
            "(set TASKSTREAM_SIGNING_KEY to accept signed code)"
        )
    if not code.sig:
        raise TaskRefused(f"refusing unsigned shipped code for task {task!r}")
    expected = sign_code(key, task, code.name, code.source)
    if not hmac.compare_digest(expected, code.sig):
        raise TaskRefused(f"refusing shipped code for task {task!r}: the signature does not match this worker's key")


_LOADED: dict[str, Callable[..., Any]] = {}
_LOADED_LOCK = threading.Lock()


def load_shipped(code: ShippedCode) -> Callable[..., Any]:
    """Compile verified shipped code once (cached by signature) and return the function."""
    cache_key = code.sig or hashlib.sha256(code.source.encode()).hexdigest()
    with _LOADED_LOCK:
        func = _LOADED.get(cache_key)
        if func is not None:
            return func
    namespace: dict[str, Any] = {"__name__": "taskstream.shipped", "__builtins__": builtins}
    try:
        exec(compile(code.source, f"<shipped {code.name}>", "exec"), namespace)
    except Exception as exc:
        raise TaskRefused(f"shipped code for {code.name!r} does not load: {type(exc).__name__}: {exc}") from exc
    func = cast("Callable[..., Any] | None", namespace.get(code.name))
    if not callable(func):
        raise TaskRefused(f"shipped code defines no function called {code.name!r}")
    with _LOADED_LOCK:
        _LOADED[cache_key] = func
    return func

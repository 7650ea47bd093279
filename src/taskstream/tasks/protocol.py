"""What task and result messages look like on the wire, and signed code shipping.

A task is an :class:`~taskstream.messages.Envelope` with ``kind="task"``, ``id`` = task id,
``reply_to`` = the submitting client's reply queue, and this body::

    {"task": "pi", "args": [1000000], "kwargs": {},
     "retries": 0, "timeout": null, "cpu_bound": true,       # options; the worker's registry fills gaps
     "items": [[[1], {}], [[2], {}]],                         # only for map chunks: one call per item
     "code": {"name": "pi", "source": "def pi(n): ...",       # only when shipped
              "expires": 1.7e9, "sig": "<64 hex: HMAC-SHA256>"}}

A result is an envelope with ``kind="result"``, ``correlation_id`` = task id and the body::

    {"task_id": "...", "status": "success" | "failed" | "cancelled", "result": <value>,
     "error": {"type": "ZeroDivisionError", "message": "...", "traceback": "..."},
     "started_at": 1.7e9, "finished_at": 1.7e9, "worker": "host:pid", "attempts": 1}

For a map chunk ``result`` is a list with one ``{"ok": value}`` or ``{"error": {...}}`` per item. A client
checks every result body against :class:`TaskReply` before it settles a future: a reply with broken fields
fails the task's futures with a :class:`~taskstream.errors.TaskError` naming the field.

Task ids are 32 random hex characters (128 bits): one id tells nothing about another. A worker answers a
task id it has finished already (a duplicate delivery) only on the reply queue that submitted it.

Code shipping (opt-in, ``@app.task(ship_code=True)``): the client sends the function's source with every
call, and signs *each submission* with ``settings.signing_key``: the HMAC-SHA256 covers the canonical form
(:func:`canonical_request`) of the whole request, that is the task id, ``reply_to``, task name, code name
and source, ``args``, ``kwargs``, ``retries``, ``retry_delay``, ``timeout``, ``cpu_bound``, ``items`` and
the expiry ``expires`` (Unix time, :data:`SIGNATURE_LIFETIME` seconds after submission). A captured signature
is therefore good for that one call, answered to that one reply queue, until it expires. A worker runs
shipped code only when its own key verifies the signature and the signature has not expired; unsigned code,
a signature that is not 64 hex characters, a bad or expired signature, or a worker with no key is refused
(the client gets :class:`~taskstream.tasks.errors.TaskRefused` and the message is dead-lettered with the
reason). Shipped calls run with ``retries`` capped at ``MAX_RETRIES`` like any other. Nothing is ever
unpickled. A shipped function must be self-contained (imports inside its body), as with funcX.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import hmac
import inspect
import secrets
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from taskstream.errors import ConfigurationError
from taskstream.messages import dumps
from taskstream.tasks.errors import TaskRefused
from taskstream.tasks.stores.base import TaskInfo

__all__ = [
    "SIGNATURE_LIFETIME",
    "ShippedCode",
    "TaskReply",
    "TaskRequest",
    "canonical_request",
    "function_source",
    "load_shipped",
    "new_task_id",
    "reply_body",
    "sign_request",
    "verify_request",
]

SIGNATURE_LIFETIME = 3600.0
"""Seconds a shipped-code signature stays valid after submission (``expires`` = submit time + this)."""

_SIGNING_DOMAIN = b"taskstream-code-v2\x00"
_HEX = frozenset("0123456789abcdef")
_SIG_LENGTH = 64


def new_task_id() -> str:
    """A new task id: 32 random hex characters (128 bits from the OS's CSPRNG, about half a microsecond)."""
    return secrets.token_hex(16)


class TaskReply(BaseModel):
    """The body of a result message, as a client checks it before settling any future."""

    model_config = ConfigDict(extra="ignore")

    task_id: str = ""
    status: Literal["success", "failed", "cancelled"]
    result: Any = None
    error: dict[str, str] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str = ""
    attempts: int = Field(default=0, ge=0)


class ShippedCode(BaseModel):
    """A function's source, the signature of the request that carries it, and when that signature expires."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    sig: str = ""
    expires: float | None = Field(default=None, allow_inf_nan=False)


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


def reply_body(info: TaskInfo) -> dict[str, Any]:
    """The body of a result message for a finished task (what :class:`TaskReply` checks)."""
    body: dict[str, Any] = {
        "task_id": info.task_id,
        "status": info.status,
        "started_at": info.started_at,
        "finished_at": info.finished_at,
        "worker": info.worker,
        "attempts": info.attempts,
    }
    if info.status == "success":
        body["result"] = info.result
    elif info.error is not None:
        body["error"] = info.error
    return body


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


def canonical_request(task_id: str, reply_to: str | None, request: TaskRequest) -> bytes:
    """The bytes a shipped-code signature covers: the whole request, after the domain ``taskstream-code-v2``.

    A JSON object with sorted keys (orjson ``OPT_SORT_KEYS``) of the task id, ``reply_to``, task name, code
    name and source, ``expires``, ``args``, ``kwargs``, ``retries``, ``retry_delay``, ``timeout``,
    ``cpu_bound`` and ``items``, as they travel (bytes and arrays in their tagged wire form, tuples as
    lists). Client and worker build it from the validated :class:`TaskRequest`, so both agree on types.

    Raises:
        TypeError: a value cannot travel.
    """
    code = request.code
    doc = {
        "id": task_id,
        "reply_to": reply_to or None,
        "task": request.task,
        "code": None if code is None else {"name": code.name, "source": code.source},
        "expires": None if code is None else code.expires,
        "args": request.args,
        "kwargs": request.call_kwargs,
        "retries": request.retries,
        "retry_delay": request.retry_delay,
        "timeout": request.timeout,
        "cpu_bound": request.cpu_bound,
        "items": request.items,
    }
    wire = orjson.loads(dumps(doc))  # the wire form: tagged bytes/arrays, str keys
    return _SIGNING_DOMAIN + orjson.dumps(wire, option=orjson.OPT_SORT_KEYS)


def _mac(key: bytes, task_id: str, reply_to: str | None, request: TaskRequest) -> str:
    return hmac.new(key, canonical_request(task_id, reply_to, request), hashlib.sha256).hexdigest()


def sign_request(
    key: bytes,
    task_id: str,
    reply_to: str | None,
    body: Mapping[str, Any],
    *,
    expires: float | None = None,
) -> dict[str, Any]:
    """A copy of the task message ``body`` whose ``code`` carries ``expires`` and the signature.

    Args:
        key: the signing key (``settings.signing_key``).
        task_id: the envelope's id.
        reply_to: the envelope's ``reply_to``.
        body: the request body with ``code: {"name", "source"}``.
        expires: Unix time the signature stops being valid; ``now + SIGNATURE_LIFETIME`` when ``None``.

    Raises:
        ConfigurationError: ``body`` carries no code or is not a valid request.
        TypeError: an argument cannot travel.
    """
    code = body.get("code")
    if not isinstance(code, Mapping) or "name" not in code or "source" not in code:
        raise ConfigurationError("sign_request: the body carries no code to sign (code: {name, source})")
    expiry = time.time() + SIGNATURE_LIFETIME if expires is None else expires
    unsigned = {**body, "code": {"name": code["name"], "source": code["source"], "expires": expiry}}
    try:
        request = TaskRequest.model_validate(unsigned)
    except PydanticValidationError as exc:
        raise ConfigurationError(f"sign_request: not a valid task request: {exc.errors()[0]['msg']}") from None
    return {**unsigned, "code": {**unsigned["code"], "sig": _mac(key, task_id, reply_to, request)}}


def verify_request(
    key: bytes | None, task_id: str, reply_to: str | None, request: TaskRequest, *, now: float | None = None
) -> ShippedCode:
    """The request's shipped code, or :class:`TaskRefused` unless its signature is valid and unexpired.

    The signature must be 64 lowercase hex characters, match the HMAC of :func:`canonical_request` under
    ``key``, and ``code.expires`` must lie ahead of ``now``.
    """
    task, code = request.task, request.code
    if code is None:
        raise TaskRefused(f"task {task!r} carries no shipped code to verify")
    if key is None:
        raise TaskRefused(
            f"refusing shipped code for task {task!r}: this worker has no signing key "
            "(set TASKSTREAM_SIGNING_KEY to accept signed code)"
        )
    if not code.sig:
        raise TaskRefused(f"refusing unsigned shipped code for task {task!r}")
    if len(code.sig) != _SIG_LENGTH or not _HEX.issuperset(code.sig):
        raise TaskRefused(
            f"refusing shipped code for task {task!r}: its signature is not {_SIG_LENGTH} lowercase hex characters"
        )
    if code.expires is None:
        raise TaskRefused(f"refusing shipped code for task {task!r}: its signature carries no expiry")
    try:
        expected = _mac(key, task_id, reply_to, request)
    except (TypeError, orjson.JSONDecodeError) as exc:
        raise TaskRefused(f"refusing shipped code for task {task!r}: the request cannot be verified ({exc})") from None
    if not hmac.compare_digest(expected.encode("ascii"), code.sig.encode("ascii")):
        raise TaskRefused(
            f"refusing shipped code for task {task!r}: the signature does not match this worker's key "
            "(or the request was changed after it was signed)"
        )
    current = time.time() if now is None else now
    if code.expires <= current:
        raise TaskRefused(
            f"refusing shipped code for task {task!r}: its signature expired {current - code.expires:.0f} s ago "
            f"(signatures last {SIGNATURE_LIFETIME:.0f} s from submission)"
        )
    return code


_LOADED: dict[str, Callable[..., Any]] = {}
_LOADED_LOCK = threading.Lock()


def load_shipped(code: ShippedCode) -> Callable[..., Any]:
    """Compile verified shipped code once (cached by name and source) and return the function."""
    cache_key = hashlib.sha256(code.name.encode() + b"\x00" + code.source.encode()).hexdigest()
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

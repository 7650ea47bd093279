"""The stateful primitive: per-key logic with timers and snapshots.

A stateful step keeps one :class:`KeyedLogic` per key. The runtime calls ``on_batch`` with the values of one
key in arrival order, ``on_notify`` when the time returned by ``notify_at`` has come, and ``on_eof`` at
end-of-stream. Each returns ``(port, value)`` pairs; the runtime re-attaches the key, so a stateful step's
outputs are keyed. A value the logic cannot take is reported as ``("error", (value, exception))`` and
dead-lettered with the reason; if ``on_batch`` raises instead, its whole batch is dead-lettered (it may have
applied part of it, so values are never retried one by one, which could count them twice).
``snapshot()`` returns JSON data from which ``builder(ctx, key, snapshot)`` rebuilds the logic after a
restart. Windows, joins and batching are all built on this.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Emit", "KeyedLogic"]

Emit = list[tuple[str, Any]]


class KeyedLogic(abc.ABC):
    """The state and behaviour of one key of a stateful step."""

    __slots__ = ()

    @abc.abstractmethod
    def on_batch(self, values: list[Any]) -> Emit:
        """Take the next values of this key, in order; return what to emit."""

    def on_notify(self, now: float) -> Emit:
        """Called once ``now >= notify_at()``."""
        return []

    def on_eof(self) -> Emit:
        """End of stream: emit everything still held."""
        return []

    def notify_at(self) -> float | None:
        """When this key next needs ``on_notify`` (processing time), or ``None``."""
        return None

    def is_empty(self) -> bool:
        """True when the logic holds nothing worth keeping; the runtime then drops it."""
        return False

    def output_id(self, port: str, value: Any) -> str | None:
        """What identifies ``value`` (just emitted on ``port``) among this key's outputs, if anything does.

        A window names its result by the window, so a result made again after a restart carries the same record
        id downstream (see :mod:`~taskstream.stream_ops.lineage`). ``None``: the output has no identity of its own.
        """
        return None

    @abc.abstractmethod
    def snapshot(self) -> Any:
        """The state as JSON data."""

"""Clocks: where a record's time comes from and how the watermark moves.

* :class:`EventClock` reads the event time from each record (a field name or a function). The watermark of a
  key is the largest event time seen for that key minus ``allowed_lateness``; a window closes when the watermark
  passes its end. Records of a key whose windows have all closed are *late* and go to the ``late`` output.
  Watermarks are kept per key, so results do not depend on how keys are spread over replicas or interleaved.
* :class:`SystemClock` stamps records with the processing time (``now()``); windows close on timers when
  ``now()`` passes their end. ``now`` is injectable (:class:`ManualTime` in tests).

At end-of-stream every open window closes, whatever the clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskstream.errors import ConfigurationError

__all__ = ["Clock", "EventClock", "ManualTime", "SystemClock", "field_getter"]


def field_getter(spec: str | Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """A getter from a field name (``"t"`` reads ``record["t"]`` or ``record.t``), a function, or identity."""
    if spec is None:
        return _identity
    if callable(spec):
        return spec
    name = spec

    def get(record: Any) -> Any:
        try:
            return record[name]
        except (TypeError, KeyError, IndexError):
            try:
                return getattr(record, name)
            except AttributeError:
                raise KeyError(f"record has no field {name!r}: {record!r:.120}") from None

    return get


def _identity(value: Any) -> Any:
    return value


class Clock:
    """Base of the clocks; see the module docstring."""

    event_time: bool = False


@dataclass(frozen=True)
class EventClock(Clock):
    """Event time read from each record.

    Args:
        ts: field name or function giving the event time in seconds (float, e.g. ``time.time()`` at the source).
        allowed_lateness: how far behind the newest record of a key a record may be and still count.
    """

    ts: str | Callable[[Any], float]
    allowed_lateness: float = 0.0

    event_time = True

    def __post_init__(self) -> None:
        if self.allowed_lateness < 0 or math.isnan(self.allowed_lateness):
            raise ConfigurationError(f"allowed_lateness must be >= 0, got {self.allowed_lateness}")

    def getter(self) -> Callable[[Any], float]:
        return field_getter(self.ts)


@dataclass(frozen=True)
class SystemClock(Clock):
    """Processing time: a record's time is ``now()`` when it is processed.

    Args:
        now: the time source; ``None`` uses the runtime's (``time.time`` unless the run injects another).
    """

    now: Callable[[], float] | None = None


class ManualTime:
    """A clock for tests: ``now()`` returns what ``set``/``advance`` made it; ``sleep`` advances it at once.

    Example:
        >>> t = ManualTime(100.0)
        >>> t.advance(2.5)
        >>> t()
        102.5
    """

    def __init__(self, start: float = 0.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value

    def now(self) -> float:
        return self.value

    def set(self, value: float) -> None:
        self.value = value

    def advance(self, seconds: float) -> None:
        self.value += seconds

    async def sleep(self, seconds: float) -> None:
        """Advance the time by ``seconds`` and yield to the loop once."""
        self.value += max(0.0, seconds)
        await asyncio.sleep(0)


def default_now() -> float:
    return time.time()

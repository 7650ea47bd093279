"""Clocks: where a record's time comes from and how the watermark moves.

The clock alone decides how a key's watermark moves; the window logic only asks it. A :class:`Clock` is the
configuration; :meth:`Clock.build` makes the per-key :class:`ClockLogic` that holds the watermark and carries it
in the key's snapshot.

* :class:`EventClock` reads the event time from each record (a field name or a function). The watermark of a
  key is the largest event time seen for that key minus ``allowed_lateness``; a window closes when the watermark
  passes its end. Records of a key whose windows have all closed are *late* and go to the ``late`` output.
  Watermarks are kept per key, so results do not depend on how keys are spread over replicas or interleaved.
  With ``idle_timeout``, a key that has sent nothing for that many seconds of the runtime's time has its
  watermark moved on with that time (from its newest event time), so its windows close in an endless stream.
* :class:`SystemClock` stamps records with the processing time (``now()``); windows close on timers when
  ``now()`` passes their end. ``now`` is injectable (:class:`ManualTime` in tests).

At end-of-stream every open window closes, whatever the clock.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskstream.errors import ConfigurationError

__all__ = [
    "NEG_INF",
    "Clock",
    "ClockLogic",
    "EventClock",
    "ManualTime",
    "SystemClock",
    "default_now",
    "field_getter",
]

NEG_INF = -math.inf


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


class ClockLogic(abc.ABC):
    """The time of one key: stamps its values and owns its watermark.

    The window logic calls :meth:`before_batch` once per batch, then :meth:`time_of` and :meth:`advance` per
    value (placing the value against the watermark *before* its own advance), and closes the windows whose end
    is at or before :attr:`watermark`. :meth:`on_notify` moves the watermark with the runtime's time (processing
    time, idle keys); :meth:`wake_at` says when that would close a window ending at ``end``.
    """

    __slots__ = ("watermark",)

    watermark: float

    def before_batch(self) -> None:  # noqa: B027 - a hook most clocks do not need
        """A batch of this key's values is about to be stamped."""

    @abc.abstractmethod
    def time_of(self, value: Any) -> float:
        """The time of ``value`` (may raise: the value is then dead-lettered with the reason)."""

    def advance(self, t: float) -> None:  # noqa: B027 - clocks whose watermark values do not move keep this
        """A value stamped ``t`` was taken: move the watermark if the clock says so."""

    def on_notify(self, now: float) -> float:
        """The runtime's time is ``now``: return the watermark (moved if the clock moves with time)."""
        return self.watermark

    def wake_at(self, end: float) -> float | None:
        """The runtime time at which the watermark reaches ``end`` without new values, or ``None``: never."""
        return None

    def disposable(self) -> bool:
        """True when nothing of this clock needs keeping once the key holds no window."""
        return False

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The clock's state as JSON data (merged into the window logic's snapshot)."""


class Clock:
    """Base of the clocks; see the module docstring."""

    event_time: bool = False

    @property
    def uses_timers(self) -> bool:
        """True when the watermark moves with the runtime's time, so the runtime must wake the window step."""
        return False

    def build(self, now: Callable[[], float]) -> Callable[[dict[str, Any] | None], ClockLogic]:
        """The factory of per-key clock logic, given the runtime's time source (and a key's snapshot)."""
        raise NotImplementedError

    def over(self, fn: Callable[[Any], Any]) -> Clock:
        """This clock reading the time of ``fn(value)`` instead of ``value`` (used by joins)."""
        return self


@dataclass(frozen=True)
class EventClock(Clock):
    """Event time read from each record.

    Args:
        ts: field name or function giving the event time in seconds (float, e.g. ``time.time()`` at the source).
        allowed_lateness: how far behind the newest record of a key a record may be and still count.
        idle_timeout: seconds (of the runtime's time) a key may stay quiet before its watermark moves on with
            that time; ``None``: the watermark moves only with the key's records.
    """

    ts: str | Callable[[Any], float]
    allowed_lateness: float = 0.0
    idle_timeout: float | None = None

    event_time = True

    def __post_init__(self) -> None:
        if self.allowed_lateness < 0 or math.isnan(self.allowed_lateness):
            raise ConfigurationError(f"allowed_lateness must be >= 0, got {self.allowed_lateness}")
        if self.idle_timeout is not None and not (self.idle_timeout > 0 and math.isfinite(self.idle_timeout)):
            raise ConfigurationError(f"idle_timeout must be a positive number of seconds, got {self.idle_timeout!r}")

    @property
    def uses_timers(self) -> bool:
        return self.idle_timeout is not None

    def getter(self) -> Callable[[Any], float]:
        return field_getter(self.ts)

    def over(self, fn: Callable[[Any], Any]) -> Clock:
        get = self.getter()
        return EventClock(lambda value: get(fn(value)), self.allowed_lateness, self.idle_timeout)

    def build(self, now: Callable[[], float]) -> Callable[[dict[str, Any] | None], ClockLogic]:
        get_ts, lateness, idle = self.getter(), self.allowed_lateness, self.idle_timeout
        if idle is None:
            field = self.ts if isinstance(self.ts, str) else None
            return lambda state: EventClockLogic(get_ts, lateness, state, field=field)
        return lambda state: IdleEventClockLogic(get_ts, lateness, state, idle=idle, now=now)


class EventClockLogic(ClockLogic):
    """Watermark = largest event time seen minus the allowed lateness.

    ``field``: the field name ``get_ts`` reads, when it reads one (the window logic's hot path reads
    ``value[field]`` itself and calls ``get_ts`` only when that fails).
    """

    __slots__ = ("field", "get_ts", "lateness")

    def __init__(
        self,
        get_ts: Callable[[Any], float],
        lateness: float,
        state: dict[str, Any] | None,
        *,
        field: str | None = None,
    ) -> None:
        self.get_ts = get_ts
        self.lateness = lateness
        self.field = field
        wm = state.get("wm") if state else None
        self.watermark = NEG_INF if wm is None else float(wm)

    def time_of(self, value: Any) -> float:
        return self.get_ts(value)

    def advance(self, t: float) -> None:
        if t - self.lateness > self.watermark:
            self.watermark = t - self.lateness

    def snapshot(self) -> dict[str, Any]:
        return {"wm": None if self.watermark == NEG_INF else self.watermark}


class IdleEventClockLogic(EventClockLogic):
    """:class:`EventClockLogic` whose watermark moves with the runtime's time once the key is quiet.

    After ``idle`` seconds without a value, the watermark is the newest event time plus the time since that
    value arrived (the key is taken to have moved on at the pace of the clock); it never goes back. A window
    ending at ``end`` therefore closes ``max(idle, end - newest)`` after the key's last value: within
    ``idle`` plus one window length. A restored key starts a fresh idle period.
    """

    __slots__ = ("idle", "newest", "now", "seen_at")

    def __init__(
        self,
        get_ts: Callable[[Any], float],
        lateness: float,
        state: dict[str, Any] | None,
        *,
        idle: float,
        now: Callable[[], float],
    ) -> None:
        super().__init__(get_ts, lateness, state)
        self.idle = idle
        self.now = now
        newest = state.get("newest") if state else None
        self.newest = NEG_INF if newest is None else float(newest)
        self.seen_at = now()  # a restored key gets a fresh idle period: the downtime is not its silence

    def before_batch(self) -> None:
        self.seen_at = self.now()

    def advance(self, t: float) -> None:
        super().advance(t)
        if t > self.newest:
            self.newest = t

    def on_notify(self, now: float) -> float:
        quiet = now - self.seen_at
        if quiet >= self.idle and self.newest != NEG_INF:
            self.watermark = max(self.watermark, self.newest + quiet)
        return self.watermark

    def wake_at(self, end: float) -> float | None:
        if self.newest == NEG_INF:
            return None
        return self.seen_at + max(self.idle, end - self.newest)

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        if self.newest != NEG_INF:
            out["newest"] = self.newest
        return out


@dataclass(frozen=True)
class SystemClock(Clock):
    """Processing time: a record's time is ``now()`` when it is processed.

    Args:
        now: the time source; ``None`` uses the runtime's (``time.time`` unless the run injects another).
    """

    now: Callable[[], float] | None = None

    @property
    def uses_timers(self) -> bool:
        return True

    def build(self, now: Callable[[], float]) -> Callable[[dict[str, Any] | None], ClockLogic]:
        source = self.now or now
        return lambda state: SystemClockLogic(source)


class SystemClockLogic(ClockLogic):
    """Every value of a batch is stamped with ``now()`` at the batch; the watermark is the last notified time."""

    __slots__ = ("batch_now", "now")

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.watermark = NEG_INF
        self.batch_now = NEG_INF

    def before_batch(self) -> None:
        self.batch_now = self.now()

    def time_of(self, value: Any) -> float:
        return self.batch_now

    def on_notify(self, now: float) -> float:
        self.watermark = max(self.watermark, now)
        return self.watermark

    def wake_at(self, end: float) -> float | None:
        return end

    def disposable(self) -> bool:
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"wm": None}


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

"""Windowers: which windows a time belongs to, and the open windows of one key.

=====================  ==============================================================================
Windower               Windows
=====================  ==============================================================================
``TumblingWindow(L)``  ``[k*L, (k+1)*L)`` (shifted by ``align_to``): each time in exactly one window
``SlidingWindow(L, S)``  length ``L`` starting every ``S`` seconds: each time in about ``L/S`` windows
``SessionWindow(gap)``   records closer than ``gap`` to each other share a window; it ends ``gap`` after
                         its last record (windows merge when a record bridges them)
=====================  ==============================================================================

A window is ``(start, end)`` in seconds, start inclusive, end exclusive. :meth:`Windower.open_windows` makes
the :class:`OpenWindows` of one key (the accumulators of its windows that have not closed yet): a new windower
brings its own ``OpenWindows`` and the window logic does not change.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.aggregators import Aggregator

__all__ = ["FixedWindows", "OpenWindows", "SessionWindow", "Sessions", "SlidingWindow", "TumblingWindow", "Windower"]

Closed = list[tuple[float, float, Any]]


class OpenWindows(abc.ABC):
    """The windows of one key that are still open, with their accumulators."""

    __slots__ = ()

    @abc.abstractmethod
    def place(self, t: float, value: Any, watermark: float) -> bool:
        """Add ``value`` (time ``t``) to its windows that end after ``watermark``; False if there are none."""

    @abc.abstractmethod
    def close(self, watermark: float) -> Closed:
        """Remove and return ``(start, end, accumulator)`` of every window ending at or before ``watermark``,
        in order of end then start."""

    @abc.abstractmethod
    def next_end(self) -> float | None:
        """The earliest end of an open window, or ``None`` when none is open."""

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The open windows as JSON data."""


class Windower:
    """Base of the windowers."""

    def assign(self, t: float) -> list[tuple[float, float]]:
        raise NotImplementedError

    def open_windows(self, aggregator: Aggregator, state: dict[str, Any] | None) -> OpenWindows:
        """The open windows of one key (restored from ``state``, a :meth:`OpenWindows.snapshot`)."""
        return FixedWindows(self, aggregator, state)


class FixedWindows(OpenWindows):
    """Windows given by :meth:`Windower.assign` (tumbling, sliding): ``{(start, end): accumulator}``."""

    __slots__ = ("agg", "assign", "open")

    def __init__(self, windower: Windower, aggregator: Aggregator, state: dict[str, Any] | None) -> None:
        self.assign = windower.assign
        self.agg = aggregator
        self.open: dict[tuple[float, float], Any] = {}
        if state:
            self.open = {(s, e): acc for s, e, acc in state["open"]}

    def place(self, t: float, value: Any, watermark: float) -> bool:
        placed = False
        open_ = self.open
        agg = self.agg
        for w in self.assign(t):
            if w[1] > watermark:
                acc = open_.get(w)
                open_[w] = agg.add(agg.zero() if acc is None else acc, value)
                placed = True
        return placed

    def close(self, watermark: float) -> Closed:
        open_ = self.open
        due = [w for w in open_ if w[1] <= watermark]
        if not due:
            return []
        due.sort(key=lambda w: (w[1], w[0]))
        return [(w[0], w[1], open_.pop(w)) for w in due]

    def next_end(self) -> float | None:
        return min(w[1] for w in self.open) if self.open else None

    def snapshot(self) -> dict[str, Any]:
        return {"open": [[w[0], w[1], acc] for w, acc in self.open.items()]}


class TumblingWindows(FixedWindows):
    """:class:`FixedWindows` of a :class:`TumblingWindow`: each time's one window computed inline (the hot path
    of event-time windows), with the same arithmetic as :meth:`TumblingWindow.assign`."""

    __slots__ = ("add", "align", "length", "zero")

    def __init__(self, windower: TumblingWindow, aggregator: Aggregator, state: dict[str, Any] | None) -> None:
        super().__init__(windower, aggregator, state)
        self.align = windower.align_to
        self.length = windower.length
        self.add = aggregator.add
        self.zero = aggregator.zero

    def place(self, t: float, value: Any, watermark: float) -> bool:
        align, length = self.align, self.length
        start = align + math.floor((t - align) / length) * length
        end = start + length
        if end > watermark:
            open_ = self.open
            w = (start, end)
            acc = open_.get(w)
            open_[w] = self.add(self.zero() if acc is None else acc, value)
            return True
        return False


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class TumblingWindow(Windower):
    """Fixed, non-overlapping windows of ``length`` seconds, aligned to ``align_to``."""

    length: float
    align_to: float = 0.0

    def __post_init__(self) -> None:
        _positive("TumblingWindow length", self.length)

    def assign(self, t: float) -> list[tuple[float, float]]:
        start = self.align_to + math.floor((t - self.align_to) / self.length) * self.length
        return [(start, start + self.length)]

    def open_windows(self, aggregator: Aggregator, state: dict[str, Any] | None) -> OpenWindows:
        if type(self) is TumblingWindow:  # a subclass may assign otherwise: it keeps the general path
            return TumblingWindows(self, aggregator, state)
        return FixedWindows(self, aggregator, state)


@dataclass(frozen=True)
class SlidingWindow(Windower):
    """Windows of ``length`` seconds starting every ``step`` seconds (overlapping when ``step < length``)."""

    length: float
    step: float
    align_to: float = 0.0

    def __post_init__(self) -> None:
        _positive("SlidingWindow length", self.length)
        _positive("SlidingWindow step", self.step)
        if self.step > self.length:
            raise ConfigurationError(
                f"SlidingWindow step ({self.step}) is longer than its length ({self.length}): "
                "records between windows would belong to none"
            )

    def assign(self, t: float) -> list[tuple[float, float]]:
        last = math.floor((t - self.align_to) / self.step)
        first = math.floor((t - self.align_to - self.length) / self.step) + 1
        out = []
        for k in range(first, last + 1):
            start = self.align_to + k * self.step
            if start <= t < start + self.length:
                out.append((start, start + self.length))
        return out


@dataclass(frozen=True)
class SessionWindow(Windower):
    """Activity sessions: a window ends ``gap`` seconds after its last record."""

    gap: float

    def __post_init__(self) -> None:
        _positive("SessionWindow gap", self.gap)

    def assign(self, t: float) -> list[tuple[float, float]]:
        return [(t, t + self.gap)]

    def open_windows(self, aggregator: Aggregator, state: dict[str, Any] | None) -> OpenWindows:
        return Sessions(self.gap, aggregator, state)


class Sessions(OpenWindows):
    """Session windows of one key: ``[start, last, acc]`` entries; a session ends ``gap`` after ``last``."""

    __slots__ = ("agg", "gap", "sessions")

    def __init__(self, gap: float, aggregator: Aggregator, state: dict[str, Any] | None) -> None:
        self.gap = gap
        self.agg = aggregator
        self.sessions: list[list[Any]] = [list(s) for s in state["sessions"]] if state else []

    def place(self, t: float, value: Any, watermark: float) -> bool:
        gap = self.gap
        agg = self.agg
        touching = [s for s in self.sessions if s[0] - gap < t < s[1] + gap]
        if not touching:
            if t + gap <= watermark:
                return False
            self.sessions.append([t, t, agg.add(agg.zero(), value)])
            return True
        first = touching[0]
        for other in touching[1:]:
            first[0] = min(first[0], other[0])
            first[1] = max(first[1], other[1])
            first[2] = agg.merge(first[2], other[2])
            self.sessions.remove(other)
        first[0] = min(first[0], t)
        first[1] = max(first[1], t)
        first[2] = agg.add(first[2], value)
        return True

    def close(self, watermark: float) -> Closed:
        gap = self.gap
        due = [s for s in self.sessions if s[1] + gap <= watermark]
        if not due:
            return []
        due.sort(key=lambda s: (s[1], s[0]))
        out: Closed = []
        for s in due:
            self.sessions.remove(s)
            out.append((s[0], s[1] + gap, s[2]))
        return out

    def next_end(self) -> float | None:
        return float(min(s[1] for s in self.sessions)) + self.gap if self.sessions else None

    def snapshot(self) -> dict[str, Any]:
        return {"sessions": self.sessions}

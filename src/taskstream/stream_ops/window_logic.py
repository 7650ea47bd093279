"""Window logic: the third part of a window step, after the clock and the windower.

One :class:`WindowLogic` (tumbling and sliding) or :class:`SessionLogic` per key holds the open windows and
their accumulators plus the key's watermark. Results leave on port ``down`` as dicts
``{"key", "start", "end", <aggregator results>}``; late records leave on port ``late`` unchanged; a record
whose time or aggregation raises leaves on ``error`` (the runtime dead-letters it with the reason).

Lateness (event time): a record is late when every window it belongs to has already closed, i.e. its window
end is at or before the key's watermark (largest event time seen minus ``allowed_lateness``). Windows are
emitted in order of their end when the watermark passes it, and all at end-of-stream. A late record is never
dropped: it goes to the ``late`` output (and, if nothing consumes that output, to the dead-letter queue).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskstream.stream_ops.aggregators import Aggregator
from taskstream.stream_ops.clock import Clock, EventClock, SystemClock
from taskstream.stream_ops.stateful import Emit, KeyedLogic
from taskstream.stream_ops.windowers import SessionWindow, Windower

__all__ = ["SessionLogic", "WindowLogic", "WindowSpec"]

NEG_INF = -math.inf


@dataclass
class WindowSpec:
    """Everything the window logic of every key shares (built once per runtime)."""

    clock: Clock
    windower: Windower
    aggregator: Aggregator
    finish: Callable[[str, float, float, Any], Any]
    get_ts: Callable[[Any], float] | None
    lateness: float
    now: Callable[[], float]

    @classmethod
    def build(
        cls,
        clock: Clock,
        windower: Windower,
        aggregator: Aggregator,
        finish: Callable[[str, float, float, Any], Any],
        runtime_now: Callable[[], float],
    ) -> WindowSpec:
        if isinstance(clock, EventClock):
            return cls(clock, windower, aggregator, finish, clock.getter(), clock.allowed_lateness, runtime_now)
        if isinstance(clock, SystemClock):
            return cls(clock, windower, aggregator, finish, None, 0.0, clock.now or runtime_now)
        raise TypeError(f"unknown clock {clock!r}")


class WindowLogic(KeyedLogic):
    """Tumbling or sliding windows of one key."""

    __slots__ = ("key", "open", "spec", "wm")

    def __init__(self, spec: WindowSpec, key: str, state: Any = None) -> None:
        self.spec = spec
        self.key = key
        self.wm = NEG_INF
        self.open: dict[tuple[float, float], Any] = {}
        if state:
            self.wm = NEG_INF if state["wm"] is None else state["wm"]
            self.open = {(s, e): acc for s, e, acc in state["open"]}

    def on_batch(self, values: list[Any]) -> Emit:
        spec = self.spec
        agg = spec.aggregator
        add = agg.add
        assign = spec.windower.assign
        open_ = self.open
        get_ts = spec.get_ts
        late: Emit = []
        if get_ts is None:  # processing time: every record of the batch is "now"
            now = spec.now()
            wins = [w for w in assign(now) if w[1] > now]
            for w in wins:
                acc = open_.get(w)
                if acc is None:
                    acc = agg.zero()
                for value in values:
                    acc = add(acc, value)
                open_[w] = acc
            return []
        lateness = spec.lateness
        wm = self.wm
        for value in values:
            try:
                t = get_ts(value)
                placed = False
                for w in assign(t):
                    if w[1] > wm:
                        acc = open_.get(w)
                        open_[w] = add(agg.zero() if acc is None else acc, value)
                        placed = True
            except Exception as exc:  # this value only: it goes to the dead-letter queue, the rest goes on
                late.append(("error", (value, exc)))
                continue
            if not placed:
                late.append(("late", value))
            if t - lateness > wm:
                wm = t - lateness
        self.wm = wm
        if late:
            return late + self._close(wm)
        return self._close(wm)

    def _close(self, wm: float) -> Emit:
        open_ = self.open
        due = [w for w in open_ if w[1] <= wm]
        if not due:
            return []
        due.sort(key=lambda w: (w[1], w[0]))
        finish = self.spec.finish
        result = self.spec.aggregator.result
        return [("down", finish(self.key, w[0], w[1], result(open_.pop(w)))) for w in due]

    def on_notify(self, now: float) -> Emit:
        if self.spec.get_ts is None:
            return self._close(now)
        return []

    def notify_at(self) -> float | None:
        if self.spec.get_ts is None and self.open:
            return min(w[1] for w in self.open)
        return None

    def on_eof(self) -> Emit:
        return self._close(math.inf)

    def is_empty(self) -> bool:
        # Event-time logic keeps its watermark even with no open window, so a later record is judged late.
        return self.spec.get_ts is None and not self.open

    def snapshot(self) -> Any:
        return {
            "wm": None if self.wm == NEG_INF else self.wm,
            "open": [[w[0], w[1], acc] for w, acc in self.open.items()],
        }


class SessionLogic(KeyedLogic):
    """Session windows of one key: ``[start, last, acc]`` entries; a session ends ``gap`` after ``last``."""

    __slots__ = ("gap", "key", "sessions", "spec", "wm")

    def __init__(self, spec: WindowSpec, key: str, state: Any = None) -> None:
        assert isinstance(spec.windower, SessionWindow)
        self.spec = spec
        self.key = key
        self.gap = spec.windower.gap
        self.wm = NEG_INF
        self.sessions: list[list[Any]] = []
        if state:
            self.wm = NEG_INF if state["wm"] is None else state["wm"]
            self.sessions = [list(s) for s in state["sessions"]]

    def _add(self, t: float, value: Any) -> bool:
        gap = self.gap
        agg = self.spec.aggregator
        touching = [s for s in self.sessions if s[0] - gap < t < s[1] + gap]
        if not touching:
            if t + gap <= self.wm:
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

    def on_batch(self, values: list[Any]) -> Emit:
        spec = self.spec
        out: Emit = []
        if spec.get_ts is None:
            now = spec.now()
            for value in values:
                self._add(now, value)
            return out
        lateness = spec.lateness
        for value in values:
            try:
                t = spec.get_ts(value)
                added = self._add(t, value)
            except Exception as exc:  # this value only: dead-lettered, the rest goes on
                out.append(("error", (value, exc)))
                continue
            if not added:
                out.append(("late", value))
            if t - lateness > self.wm:
                self.wm = t - lateness
        return out + self._close(self.wm)

    def _close(self, wm: float) -> Emit:
        gap = self.gap
        due = [s for s in self.sessions if s[1] + gap <= wm]
        if not due:
            return []
        due.sort(key=lambda s: (s[1], s[0]))
        finish = self.spec.finish
        result = self.spec.aggregator.result
        out: Emit = []
        for s in due:
            self.sessions.remove(s)
            out.append(("down", finish(self.key, s[0], s[1] + gap, result(s[2]))))
        return out

    def on_notify(self, now: float) -> Emit:
        return self._close(now) if self.spec.get_ts is None else []

    def notify_at(self) -> float | None:
        if self.spec.get_ts is None and self.sessions:
            return float(min(s[1] for s in self.sessions)) + self.gap
        return None

    def on_eof(self) -> Emit:
        return self._close(math.inf)

    def is_empty(self) -> bool:
        return self.spec.get_ts is None and not self.sessions

    def snapshot(self) -> Any:
        return {"wm": None if self.wm == NEG_INF else self.wm, "sessions": self.sessions}

"""Window logic: the third part of a window step, after the clock and the windower.

One :class:`WindowLogic` per key joins the key's :class:`~.clock.ClockLogic` (its time and watermark) and its
:class:`~.windowers.OpenWindows` (its open windows and their accumulators); it knows neither which clock nor
which windower it holds, except on one fast path: with the plain event clock (and tumbling windows) it runs
their per-value steps inline, the same steps in the same order (the per-record cost of the fused run).
Results leave on port ``down`` as dicts ``{"key", "start", "end", <aggregator results>}``; late records leave
on port ``late`` unchanged; a record whose time or aggregation raises leaves on ``error`` (the runtime
dead-letters it with the reason).

Lateness: a record is late when every window it belongs to has already closed, i.e. its window end is at or
before the key's watermark as the clock moved it before that record. Windows are emitted in order of their end
when the watermark passes it, and all at end-of-stream. A late record is never dropped: it goes to the ``late``
output (and, if nothing consumes that output, to the dead-letter queue).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taskstream.stream_ops.aggregators import Aggregator
from taskstream.stream_ops.stateful import Emit, KeyedLogic
from taskstream.stream_ops.windows.clock import Clock, ClockLogic, EventClockLogic
from taskstream.stream_ops.windows.windowers import Closed, OpenWindows, TumblingWindows, Windower

__all__ = ["WindowLogic", "WindowSpec"]


@dataclass
class WindowSpec:
    """Everything the window logic of every key shares (built once per runtime)."""

    clock: Clock
    windower: Windower
    aggregator: Aggregator
    finish: Callable[[str, float, float, Any], Any]
    clock_logic: Callable[[dict[str, Any] | None], ClockLogic]

    @classmethod
    def build(
        cls,
        clock: Clock,
        windower: Windower,
        aggregator: Aggregator,
        finish: Callable[[str, float, float, Any], Any],
        runtime_now: Callable[[], float],
    ) -> WindowSpec:
        return cls(clock, windower, aggregator, finish, clock.build(runtime_now))


class WindowLogic(KeyedLogic):
    """The windows of one key: see the module docstring."""

    __slots__ = ("clock", "key", "made", "spec", "windows")

    def __init__(self, spec: WindowSpec, key: str, state: Any = None) -> None:
        self.spec = spec
        self.key = key
        self.made: dict[int, str] = {}  # id(result) -> its window, until the runtime asks (output_id)
        self.clock = spec.clock_logic(state)
        self.windows: OpenWindows = spec.windower.open_windows(spec.aggregator, state)

    def on_batch(self, values: list[Any]) -> Emit:
        clock = self.clock
        if type(clock) is EventClockLogic:
            return self._on_event_batch(values, clock)
        clock.before_batch()
        time_of, advance, place = clock.time_of, clock.advance, self.windows.place
        out: Emit = []
        for value in values:
            try:
                t = time_of(value)
                placed = place(t, value, clock.watermark)
            except Exception as exc:  # this value only: it goes to the dead-letter queue, the rest goes on
                out.append(("error", (value, exc)))
                continue
            if not placed:
                out.append(("late", value))
            advance(t)
        closed = self.windows.close(clock.watermark)
        return out + self._finish(closed) if closed else out

    def _on_event_batch(self, values: list[Any], clock: EventClockLogic) -> Emit:
        """:meth:`on_batch` for the plain event clock (the common case), its steps inline: the same time read,
        placement against the watermark before the value's own advance, advance (``max(wm, t - lateness)``);
        with tumbling windows the placement too (:meth:`TumblingWindows.place`'s arithmetic)."""
        get_ts, field, lateness = clock.get_ts, clock.field, clock.lateness
        windows = self.windows
        place = windows.place
        tumbling = type(windows) is TumblingWindows
        if tumbling:
            assert isinstance(windows, TumblingWindows)
            align, length, open_, add, zero = windows.align, windows.length, windows.open, windows.add, windows.zero
        floor = math.floor
        wm = clock.watermark
        out: Emit = []
        try:
            for value in values:
                try:
                    if field is None:
                        t = get_ts(value)
                    else:
                        try:
                            t = value[field]
                        except (TypeError, KeyError, IndexError):
                            t = get_ts(value)  # an attribute, or the getter's error naming the field
                    if tumbling:
                        start = align + floor((t - align) / length) * length
                        end = start + length
                        placed = end > wm
                        if placed:
                            w = (start, end)
                            acc = open_.get(w)
                            open_[w] = add(zero() if acc is None else acc, value)
                    else:
                        placed = place(t, value, wm)
                except Exception as exc:  # this value only: it goes to the dead-letter queue, the rest goes on
                    out.append(("error", (value, exc)))
                    continue
                if not placed:
                    out.append(("late", value))
                if t - lateness > wm:
                    wm = t - lateness
        finally:
            clock.watermark = wm
        closed = windows.close(wm)
        return out + self._finish(closed) if closed else out

    def _finish(self, closed: Closed) -> Emit:
        finish, result, key = self.spec.finish, self.spec.aggregator.result, self.key
        out: Emit = []
        for start, end, acc in closed:
            value = finish(key, start, end, result(acc))
            self.made[id(value)] = f"{start!r}:{end!r}"
            out.append(("down", value))
        return out

    def output_id(self, port: str, value: Any) -> str | None:
        return self.made.pop(id(value), None) if port == "down" else None

    def on_notify(self, now: float) -> Emit:
        return self._finish(self.windows.close(self.clock.on_notify(now)))

    def notify_at(self) -> float | None:
        end = self.windows.next_end()
        return None if end is None else self.clock.wake_at(end)

    def on_eof(self) -> Emit:
        return self._finish(self.windows.close(math.inf))

    def is_empty(self) -> bool:
        # An event clock keeps its watermark even with no open window, so a later record is judged late.
        return self.clock.disposable() and self.windows.next_end() is None

    def snapshot(self) -> Any:
        return {**self.clock.snapshot(), **self.windows.snapshot()}

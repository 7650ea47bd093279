"""``stream.window(windower, clock)`` and its ``aggregate`` / ``reduce`` / ``collect``.

Example:
    >>> from taskstream.stream_ops import Pipeline, TumblingWindow, EventClock, Mean, Count
    >>> p = Pipeline("doc-windows")
    >>> keyed = p.source("in", [{"s": "a", "t": 0.2, "v": 1.0}, {"s": "a", "t": 0.7, "v": 3.0}]).key_by(
    ...     lambda r: r["s"])
    >>> out = keyed.window(TumblingWindow(1.0), EventClock("t")).aggregate(n=Count(), mean=Mean("v"))
    >>> results = out.collect()
    >>> _ = p.run_sync()
    >>> results
    [('a', {'key': 'a', 'start': 0.0, 'end': 1.0, 'n': 2, 'mean': 2.0})]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.aggregators import Aggregator, Collect, Named, Reduce, as_aggregator
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.stateful import KeyedLogic
from taskstream.stream_ops.windows.clock import Clock, SystemClock
from taskstream.stream_ops.windows.logic import WindowLogic, WindowSpec
from taskstream.stream_ops.windows.windowers import Windower

if TYPE_CHECKING:
    from taskstream.stream_ops.stream import Stream, WindowOut

__all__ = ["WindowedStream", "window_builder"]


def _finish(key: str, start: float, end: float, result: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "start": start, "end": end, **result}


def window_builder(
    clock: Clock,
    windower: Windower,
    aggregator: Aggregator,
    finish: Callable[[str, float, float, Any], Any] = _finish,
) -> Callable[[RuntimeContext], Callable[[str, Any], KeyedLogic]]:
    """The stateful builder of a window step (used by ``window`` and ``join``)."""

    def build(ctx: RuntimeContext) -> Callable[[str, Any], KeyedLogic]:
        spec = WindowSpec.build(clock, windower, aggregator, finish, ctx.now)
        return lambda key, state: WindowLogic(spec, key, state)

    return build


class WindowedStream:
    """A keyed stream cut into windows; finish it with ``aggregate``, ``reduce`` or ``collect``."""

    def __init__(
        self,
        up: Stream,
        windower: Windower,
        clock: Clock | None,
        *,
        name: str | None,
        stage: str | None,
    ) -> None:
        if not isinstance(windower, Windower):
            raise ConfigurationError(
                f"window() needs a TumblingWindow, SlidingWindow or SessionWindow, got {windower!r}"
            )
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigurationError(f"window() needs an EventClock or SystemClock, got {clock!r}")
        up.require_keyed("window")
        self.up = up
        self.windower = windower
        self.clock = clock or SystemClock()
        self.name = name
        self.stage = stage

    def aggregate(self, aggregator: Aggregator | None = None, /, **named: Aggregator) -> WindowOut:
        """One result per key and window: ``{"key", "start", "end", <name>: <result>, ...}``.

        ``aggregate(Mean("v"))`` names the result ``value``; ``aggregate(n=Count(), avg=Mean("v"))`` uses the
        given names.
        """
        return self._build(as_aggregator(aggregator, named), "window")

    def reduce(self, fn: Callable[[Any, Any], Any]) -> WindowOut:
        """Folds each window's records pairwise with ``fn``; the result is in ``value``."""
        return self._build(Named({"value": Reduce(fn)}), "reduce")

    def collect(self, field: str | Callable[[Any], Any] | None = None) -> WindowOut:
        """Every record (or one field of it) of each window, in arrival order, in ``values``."""
        return self._build(Named({"values": Collect(field)}), "collect")

    def _build(self, aggregator: Aggregator, label: str) -> WindowOut:
        return self.up.stateful_window(
            window_builder(self.clock, self.windower, aggregator),
            label=label,
            name=self.name,
            stage=self.stage,
            uses_timers=self.clock.uses_timers,
        )

"""``left.join(right, windower, clock)``: join two keyed streams within a window.

Built from the primitives: each side is tagged by a stateless map, both feed one stateful window step that
collects the values of each side per key and window, and a flat_map turns each closed window into pairs.

=========  ========================================================================================
``how``    Output per key and window
=========  ========================================================================================
inner      every ``(left, right)`` pair (nothing when a side is empty)
left       as inner, plus ``(left, None)`` for each left value when the right side is empty
outer      as left, plus ``(None, right)`` for each right value when the left side is empty
=========  ========================================================================================

Each output is ``(key, {"key", "start", "end", "left", "right"})``. Late records of either side leave on
``.late`` as ``(key, {"side": "left"|"right", "value": v})``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.aggregators import Aggregator
from taskstream.stream_ops.core import is_keyed
from taskstream.stream_ops.windows.clock import Clock, SystemClock
from taskstream.stream_ops.windows.operator import window_builder
from taskstream.stream_ops.windows.windowers import Windower

if TYPE_CHECKING:
    from taskstream.stream_ops.stream import Stream, WindowOut

__all__ = ["JoinSides", "join_streams"]

How = Literal["inner", "left", "outer"]


class JoinSides(Aggregator):
    """Accumulates ``[lefts, rights]`` from tagged ``("l"|"r", value)`` records."""

    def zero(self) -> list[list[Any]]:
        return [[], []]

    def add(self, acc: list[list[Any]], value: Any) -> list[list[Any]]:
        acc[0 if value[0] == "l" else 1].append(value[1])
        return acc

    def merge(self, a: list[list[Any]], b: list[list[Any]]) -> list[list[Any]]:
        return [a[0] + b[0], a[1] + b[1]]


def _pairs(how: How) -> Callable[[Any], list[Any]]:
    def pairs(item: Any) -> list[Any]:
        key, res = item
        lefts, rights = res["sides"]
        base = {"key": key, "start": res["start"], "end": res["end"]}
        out = [(key, {**base, "left": lv, "right": rv}) for lv in lefts for rv in rights]
        if not rights and how in ("left", "outer"):
            out.extend((key, {**base, "left": lv, "right": None}) for lv in lefts)
        if not lefts and how == "outer":
            out.extend((key, {**base, "left": None, "right": rv}) for rv in rights)
        return out

    return pairs


def _tag(side: str) -> Callable[[Any], Any]:
    """``(key, value) -> (key, (side, value))``; an item that is not keyed fails (and is dead-lettered)."""

    def tag(item: Any) -> Any:
        if not is_keyed(item):
            raise TypeError("join needs keyed (str, value) tuples: call key_by first")
        return (item[0], (side, item[1]))

    return tag


def _late_side(item: Any) -> Any:
    key, tagged = item
    return (key, {"side": "left" if tagged[0] == "l" else "right", "value": tagged[1]})


def _untagged(tagged: Any) -> Any:
    return tagged[1]


def _finish(key: str, start: float, end: float, sides: Any) -> dict[str, Any]:
    return {"key": key, "start": start, "end": end, "sides": sides}


def join_streams(
    left: Stream,
    right: Stream,
    windower: Windower,
    clock: Clock | None,
    *,
    how: How,
    name: str | None,
    stage: str | None,
) -> WindowOut:
    """See the module docstring."""
    if how not in ("inner", "left", "outer"):
        raise ConfigurationError(f"join how must be 'inner', 'left' or 'outer', got {how!r}")
    left.require_keyed("join")
    right.require_keyed("join")
    if left.pipeline is not right.pipeline:
        raise ConfigurationError("join() needs two streams of the same pipeline")
    clock = clock or SystemClock()
    inner_clock = clock.over(_untagged)  # the time of a tagged value is the time of the value
    tag_l = left.map(_tag("l"), name=f"{name}-left" if name else None)
    tag_r = right.map(_tag("r"), name=f"{name}-right" if name else None)
    tag_l.keyed = tag_r.keyed = True  # the tags let only keyed items through
    joined = tag_l.stateful_window(
        window_builder(inner_clock, windower, JoinSides(), _finish),
        label="join",
        name=name,
        stage=stage,
        uses_timers=clock.uses_timers,
        extra_inputs=[tag_r],
    )
    out = joined.flat_map(_pairs(how))
    out.keyed = True
    late = joined.late.map(_late_side)
    late.keyed = True
    from taskstream.stream_ops.stream import WindowOut

    return WindowOut(out.pipeline, out.node_id, late=late)

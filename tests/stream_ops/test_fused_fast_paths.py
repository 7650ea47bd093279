"""The fused run's per-record fast paths give what the general paths give (issue 15, fused vs a plain loop).

The window logic runs the plain event clock and tumbling windows inline; ``key_by``, ``map`` and ``filter`` loop
in C; ``Named`` with built-in aggregators folds through one generated function. Subclasses of the clock logic and
of ``TumblingWindow`` keep the general paths, so the two can be compared on the same records: late records,
records without the time field, with a time that is not a number, with the time as an attribute, and aggregated
values that fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from taskstream.stream_ops import Count, EventClock, Max, Mean, Sum, TumblingWindow
from taskstream.stream_ops.aggregators import Named
from taskstream.stream_ops.stateless import filter_op, key_by_op, map_op
from taskstream.stream_ops.windows.clock import EventClockLogic
from taskstream.stream_ops.windows.logic import WindowLogic, WindowSpec
from taskstream.stream_ops.windows.windowers import FixedWindows, TumblingWindows


class GeneralClockLogic(EventClockLogic):
    """The event clock through ClockLogic's per-value methods (a subclass: the fast path is not taken)."""

    __slots__ = ()


@dataclass(frozen=True)
class GeneralTumbling(TumblingWindow):
    """Tumbling windows through ``assign`` and FixedWindows (a subclass: the fast path is not taken)."""


@dataclass
class Reading:
    t: float
    v: float = 1.0


def _spec(lateness: float, *, fast_clock: bool, fast_windows: bool, length: float, align: float) -> WindowSpec:
    clock = EventClock("t", allowed_lateness=lateness)
    windower = TumblingWindow(length, align) if fast_windows else GeneralTumbling(length, align)
    spec = WindowSpec.build(
        clock,
        windower,
        Named({"n": Count(), "total": Sum("v"), "avg": Mean("v"), "hi": Max("v")}),
        lambda k, s, e, res: (k, s, e, res),
        lambda: 0.0,
    )
    if not fast_clock:
        get_ts = clock.getter()
        spec.clock_logic = lambda state: GeneralClockLogic(get_ts, lateness, state)
    return spec


def _comparable(emitted: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Errors compared by their type and message (exceptions are not equal to each other)."""
    return [
        (port, (value[0], type(value[1]).__name__, str(value[1])) if port == "error" else value)
        for port, value in emitted
    ]


times = st.one_of(
    st.floats(min_value=-5.0, max_value=30.0, allow_nan=False),
    st.integers(min_value=-5, max_value=30),
)
values = st.one_of(st.floats(min_value=-100, max_value=100, allow_nan=False), st.just("warm"))
records = st.one_of(
    st.builds(lambda t, v: {"t": t, "v": v}, times, values),  # the common case (a "warm" value fails to add)
    st.builds(lambda v: {"v": v}, values),  # no time field: dead-lettered
    st.builds(lambda v: {"t": "soon", "v": v}, values),  # a time that is not a number: dead-lettered
    st.builds(Reading, times),  # the time as an attribute
)


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.lists(records, max_size=12), min_size=1, max_size=5),
    lateness=st.sampled_from([0.0, 0.5, 2.0]),
    length=st.sampled_from([1.0, 2.5, 0.1]),
    align=st.sampled_from([0.0, 0.3]),
)
def test_the_event_clock_and_tumbling_fast_path_equals_the_general_path(
    batches: list[list[Any]], lateness: float, length: float, align: float
) -> None:
    logics = {
        (clock, win): WindowLogic(_spec(lateness, fast_clock=clock, fast_windows=win, length=length, align=align), "k")
        for clock in (True, False)
        for win in (True, False)
    }
    assert type(logics[True, True].windows) is TumblingWindows
    assert type(logics[False, False].windows) is FixedWindows
    outputs: dict[tuple[bool, bool], list[Any]] = {key: [] for key in logics}
    for batch in batches:
        for key, logic in logics.items():
            outputs[key] += _comparable(logic.on_batch(list(batch)))
            outputs[key].append(("snapshot", logic.snapshot()))
    for key, logic in logics.items():
        outputs[key] += _comparable(logic.on_eof())
    general = outputs[False, False]
    assert outputs[True, True] == general
    assert outputs[True, False] == general
    assert outputs[False, True] == general


def test_the_fast_path_sees_late_records_against_the_watermark_before_their_own() -> None:
    logic = WindowLogic(_spec(0.5, fast_clock=True, fast_windows=True, length=1.0, align=0.0), "k")
    first = {"t": 3.2, "v": 1.0}
    late = {"t": 0.9, "v": 2.0}  # its window [0, 1) ended before the watermark 2.7
    edge = {"t": 2.0, "v": 4.0}  # [2, 3) ends after 2.7: still open
    out = logic.on_batch([first, late, edge])
    assert ("late", late) in out
    assert logic.clock.watermark == 2.7
    results = [value for port, value in out + logic.on_eof() if port == "down"]
    assert [(s, e, res["n"], res["total"]) for _k, s, e, res in results] == [(2.0, 3.0, 1, 4.0), (3.0, 4.0, 1, 1.0)]


@given(st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats(allow_nan=False)), max_size=30))
def test_key_by_map_and_filter_in_c_give_what_the_comprehensions_give(items: list[Any]) -> None:
    def key(x: Any) -> Any:
        return x if isinstance(x, str) else (x if x is None or not isinstance(x, int) else x % 3)

    assert key_by_op(key).batch(items) == [
        (k if type(k) is str else str(k), x) for x, k in ((x, key(x)) for x in items)
    ]
    assert map_op(repr).batch(items) == [repr(x) for x in items]
    kept = filter_op(bool).batch(items)
    assert kept == [x for x in items if x] and all(a is b for a, b in zip(kept, [x for x in items if x], strict=True))


def test_named_folds_through_the_generated_function_and_back_to_the_general_path() -> None:
    agg = Named({"n": Count(), "total": Sum("v")})
    assert agg.add.__code__.co_filename == "<taskstream aggregators>"  # one call per value
    assert agg.add(agg.zero(), {"v": 2.5}) == [1, 2.5]
    assert agg.add(agg.zero(), Reading(1.0, 4.0)) == [1, 4.0]  # not a dict: the general path reads the attribute
    agg._fast = None  # what test_windows does to compare the two paths
    assert agg.add.__func__ is Named.add  # type: ignore[attr-defined]
    assert agg.add(agg.zero(), {"v": 2.5}) == [1, 2.5]

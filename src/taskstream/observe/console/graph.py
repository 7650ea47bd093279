"""Pipelines on the console: the graph drawn by :mod:`taskstream.stream_ops.drawing` and live figures per stage.

Each stage's row adds up the figures of its replicas' queues (depth, its rate and the rates of the metrics
counters); a source stage reads no queue and shows only its steps.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from taskstream.errors import ConfigurationError

__all__ = ["PipelineView", "StageRow", "stage_figures"]


@dataclass(frozen=True, slots=True)
class StageRow:
    """One stage as the page lists it."""

    name: str
    kind: str
    parallelism: int
    steps: tuple[str, ...]
    queues: tuple[str, ...]
    downstream: tuple[str, ...]


@dataclass(slots=True)
class PipelineView:
    """A pipeline's plan, its stage rows and (drawn on first use) its SVG."""

    name: str
    plan: Any
    dead_letter: str
    stages: list[StageRow]
    _svg: bytes | None = None
    _svg_error: str | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def of(cls, pipeline: Any) -> PipelineView:
        """The view of a :class:`~taskstream.stream_ops.pipeline.Pipeline`."""
        plan = pipeline.plan()
        rows = [
            StageRow(
                name=stage.name,
                kind="source" if stage.sources else ("stateful" if stage.stateful else "stateless"),
                parallelism=stage.parallelism,
                steps=tuple(stage.nodes),
                queues=tuple(stage.queues) if stage.consumes_queue else (),
                downstream=tuple(stage.downstream),
            )
            for stage in plan.stages.values()
        ]
        return cls(name=pipeline.name, plan=plan, dead_letter=plan.dead_letter_queue, stages=rows)

    async def svg(self) -> tuple[bytes | None, str | None]:
        """The drawing as SVG bytes, or ``(None, why not)`` (matplotlib missing); drawn once, on a thread."""
        async with self._lock:
            if self._svg is None and self._svg_error is None:
                try:
                    self._svg = await asyncio.to_thread(_draw, self.plan)
                except ConfigurationError as exc:
                    self._svg_error = str(exc)
            return self._svg, self._svg_error


def _draw(plan: Any) -> bytes:
    from taskstream.stream_ops.drawing import plan_figure

    figure = plan_figure(plan)
    import matplotlib.pyplot as plt

    try:
        out = io.BytesIO()
        figure.savefig(out, format="svg", bbox_inches="tight")
        return out.getvalue()
    finally:
        plt.close(figure)


def _add(total: float | None, value: float | None) -> float | None:
    if value is None:
        return total
    return value if total is None else total + value


def _step_rates(row: StageRow, steps: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """A stage's stream counter rates: records in at its first step, out at its last, the others summed."""
    out: dict[str, float | None] = {}
    ordered = [steps[step] for step in row.steps if step in steps]
    ordered += [figures for step, figures in sorted(steps.items()) if step not in row.steps]
    for figures in ordered:
        for name, rate in figures.items():
            if name == "records_in":
                out.setdefault(name, rate)
            elif name == "records_out":
                out[name] = rate
            else:
                out[name] = _add(out.get(name), rate)
    return out


def stage_figures(
    view: PipelineView,
    queues: Mapping[str, Mapping[str, Any]],
    steps: Mapping[tuple[str, str, str], Mapping[str, float | None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per stage: summed depth and depth rate of its replicas' queues, and its counter rates (``None``: unknown).

    The rates are the stage's stream counters (``records_in`` at its first step, ``records_out`` at its last,
    late and dead-lettered records summed) when ``steps`` has them, else the summed queue counters.
    """
    by_stage: dict[str, dict[str, Mapping[str, float | None]]] = {}
    for (pipeline, stage, step), figures in (steps or {}).items():
        if pipeline == view.name:
            by_stage.setdefault(stage, {})[step] = figures
    out: dict[str, dict[str, Any]] = {}
    for row in view.stages:
        depth: float | None = None
        depth_rate: float | None = None
        rates: dict[str, float | None] = {}
        errors: list[str] = []
        for queue in row.queues:
            state = queues.get(queue)
            if state is None:
                continue
            depth = _add(depth, state.get("depth"))
            depth_rate = _add(depth_rate, state.get("depth_rate"))
            for name, rate in (state.get("rates") or {}).items():
                rates[name] = _add(rates.get(name), rate)
            if state.get("error"):
                errors.append(str(state["error"]))
        stream = _step_rates(row, by_stage.get(row.name, {}))
        out[row.name] = {
            "depth": depth,
            "depth_rate": depth_rate,
            "rates": stream or rates,
            "error": "; ".join(errors) or None,
        }
    return out

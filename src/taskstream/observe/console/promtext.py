"""Per-queue message counters from a Prometheus endpoint, for the console's rates.

Only what the console needs of the text exposition format: sample lines ``name{label="v",...} value``.
Every counter whose name starts with ``taskstream_`` and ends with ``_total`` and that carries a ``queue``
label counts, summed over its other labels: ``taskstream_messages_handled_total{queue="orders.in"}`` becomes
``{"orders.in": {"messages_handled": 12.0}}``. Stream counters (``taskstream_stream_*_total`` with ``pipeline``,
``stage`` and ``step`` labels) are read per step the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Sample", "parse_samples", "queue_counters", "step_counters"]

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample line."""

    name: str
    labels: dict[str, str]
    value: float


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse_samples(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition; comments and lines that do not parse are skipped."""
    samples: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = {key: _unescape(val) for key, val in _LABEL.findall(match["labels"] or "")}
        samples.append(Sample(match["name"], labels, value))
    return samples


def queue_counters(text: str) -> dict[str, dict[str, float]]:
    """``{queue: {short counter name: value}}`` of the ``taskstream_*_total`` counters with a ``queue`` label."""
    out: dict[str, dict[str, float]] = {}
    for sample in parse_samples(text):
        queue = sample.labels.get("queue")
        if not queue or not sample.name.startswith("taskstream_") or not sample.name.endswith("_total"):
            continue
        if math.isnan(sample.value) or math.isinf(sample.value):
            continue
        short = sample.name.removeprefix("taskstream_").removesuffix("_total")
        figures = out.setdefault(queue, {})
        figures[short] = figures.get(short, 0.0) + sample.value
    return out


def step_counters(text: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """``{(pipeline, stage, step): {short name: value}}`` of the ``taskstream_stream_*_total`` counters."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for sample in parse_samples(text):
        labels = sample.labels
        if not sample.name.startswith("taskstream_stream_") or not sample.name.endswith("_total"):
            continue
        if not all(labels.get(k) for k in ("pipeline", "stage", "step")):
            continue
        if math.isnan(sample.value) or math.isinf(sample.value):
            continue
        short = sample.name.removeprefix("taskstream_stream_").removesuffix("_total")
        figures = out.setdefault((labels["pipeline"], labels["stage"], labels["step"]), {})
        figures[short] = figures.get(short, 0.0) + sample.value
    return out

"""Windowers: which windows a timestamp belongs to.

=====================  ==============================================================================
Windower               Windows
=====================  ==============================================================================
``TumblingWindow(L)``  ``[k*L, (k+1)*L)`` (shifted by ``align_to``): each time in exactly one window
``SlidingWindow(L, S)``  length ``L`` starting every ``S`` seconds: each time in about ``L/S`` windows
``SessionWindow(gap)``   records closer than ``gap`` to each other share a window; it ends ``gap`` after
                         its last record (windows merge when a record bridges them)
=====================  ==============================================================================

A window is ``(start, end)`` in seconds, start inclusive, end exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from taskstream.errors import ConfigurationError

__all__ = ["SessionWindow", "SlidingWindow", "TumblingWindow", "Windower"]


class Windower:
    """Base of the windowers."""

    def assign(self, t: float) -> list[tuple[float, float]]:
        raise NotImplementedError


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

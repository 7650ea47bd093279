"""The console's view of the queues: depths sampled every ``refresh`` seconds, rates from their changes.

One :class:`Sampler` per console reads every queue's figures with :func:`taskstream.observe.inspect_queues`
on its own broker connection, keeps a short history per queue, and (when metrics URLs are configured)
scrapes the per-queue message counters. Pages read :meth:`Sampler.snapshot`, so any number of open pages
costs the broker nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from taskstream.brokers.base import Broker
from taskstream.observe.console.promtext import queue_counters, step_counters
from taskstream.observe.queues import QueueInfo, inspect_queues
from taskstream.settings import redact_url

__all__ = ["HISTORY", "RATE_WINDOW", "Sampler", "Series"]

log = logging.getLogger("taskstream.observe.console")

HISTORY = 120
"""Samples kept per figure."""
RATE_WINDOW = 5.0
"""Seconds of history a rate is computed over."""
SCRAPE_TIMEOUT = 2.0


@dataclass(slots=True)
class Series:
    """Timestamped values of one figure, newest last."""

    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def add(self, at: float, value: float | None) -> None:
        if value is not None:
            self.points.append((at, value))

    def rate(self, window: float = RATE_WINDOW, *, counter: bool = False) -> float | None:
        """Change per second over the last ``window`` seconds (a counter's resets count as restarts from 0)."""
        if len(self.points) < 2:
            return None
        last_at = self.points[-1][0]
        recent = [p for p in self.points if p[0] >= last_at - window - 1e-9]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None
        if counter:
            change = sum(b - a if b >= a else b for (_, a), (_, b) in itertools.pairwise(recent))
        else:
            change = recent[-1][1] - recent[0][1]
        return change / (recent[-1][0] - recent[0][0])

    def tail(self, n: int = 60) -> list[float]:
        return [value for _, value in list(self.points)[-n:]]


K = TypeVar("K")


def _merge(into: dict[K, dict[str, float]], found: Mapping[K, Mapping[str, float]]) -> None:
    for key, figures in found.items():
        mine = into.setdefault(key, {})
        for name, value in figures.items():
            mine[name] = mine.get(name, 0.0) + value


@dataclass(slots=True)
class _QueueHistory:
    info: QueueInfo | None = None
    depth: Series = field(default_factory=Series)
    dead_letters: Series = field(default_factory=Series)
    counters: dict[str, Series] = field(default_factory=dict)


class Sampler:
    """Samples the queues' figures in the background; :meth:`snapshot` is what the pages show.

    Args:
        broker: a broker of its own (connected by :meth:`run`'s caller).
        queues: each queue with its dead-letter queue (``None``: the broker's name for it).
        metrics_urls: Prometheus endpoints to scrape for per-queue counters.
        refresh: seconds between two samples.
        scrub: removes secrets from error texts.
        lock: held while reading (the console's actions hold it while they hold dead letters).
    """

    def __init__(
        self,
        broker: Broker,
        queues: Mapping[str, str | None],
        *,
        metrics_urls: tuple[str, ...] = (),
        refresh: float = 1.0,
        scrub: Callable[[str], str] = lambda text: text,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.broker = broker
        self.queues = dict(queues)
        self.metrics_urls = metrics_urls
        self.refresh = refresh
        self.scrub = scrub
        self.sampled_at: float | None = None
        self.error: str | None = None
        self.metrics_error: str | None = None
        self._history = {queue: _QueueHistory() for queue in self.queues}
        self._steps: dict[tuple[str, str, str], dict[str, Series]] = {}
        self._wake = asyncio.Event()
        self._session: Any = None
        self._lock = lock or asyncio.Lock()

    def dead_letter(self, queue: str) -> str:
        """The dead-letter queue of ``queue``."""
        return self.queues.get(queue) or self.broker.dead_letter_name(queue)

    def poke(self) -> None:
        """Sample again now (after a replay or purge) instead of at the next tick."""
        self._wake.set()

    async def run(self) -> None:
        """Sample until cancelled."""
        try:
            while True:
                await self.sample_once()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.refresh):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            if self._session is not None:
                await self._session.close()

    async def sample_once(self) -> None:
        """Read every queue's figures (and the metrics endpoints) once."""
        try:
            async with self._lock:
                infos = await inspect_queues(self.broker, self.queues)
        except Exception as exc:  # the broker went away: show it, try again at the next tick
            self.error = self.scrub(f"cannot read the queues: {type(exc).__name__}: {exc}")
            log.warning("%s", self.error)
            return
        now = time.time()
        for info in infos:
            history = self._history[info.queue]
            history.info = info
            history.depth.add(now, info.depth)
            history.dead_letters.add(now, info.dead_letter_depth)
        self.error = None
        self.sampled_at = now
        if self.metrics_urls:
            await self._scrape(now)

    async def _scrape(self, now: float) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))
        texts: list[str] = []
        errors: list[str] = []
        for url in self.metrics_urls:
            try:
                async with self._session.get(url) as response:
                    response.raise_for_status()
                    texts.append(await response.text())
            except Exception as exc:
                errors.append(self.scrub(f"{redact_url(url)}: {type(exc).__name__}: {exc}"))
        self.metrics_error = "; ".join(errors) or None
        self._record_counters(now, texts)

    def _record_counters(self, now: float, texts: list[str]) -> None:
        """Add the counters of every endpoint (summed over the endpoints) to the history."""
        queues: dict[str, dict[str, float]] = {}
        steps: dict[tuple[str, str, str], dict[str, float]] = {}
        for text in texts:
            _merge(queues, queue_counters(text))
            _merge(steps, step_counters(text))
        for queue, figures in queues.items():
            history = self._history.get(queue)
            if history is not None:
                for name, value in figures.items():
                    history.counters.setdefault(name, Series()).add(now, value)
        for step, figures in steps.items():
            series = self._steps.setdefault(step, {})
            for name, value in figures.items():
                series.setdefault(name, Series()).add(now, value)

    def step_rates(self) -> dict[tuple[str, str, str], dict[str, float | None]]:
        """Per (pipeline, stage, step): the rate of each stream counter."""
        return {
            step: {name: s.rate(counter=True) for name, s in sorted(series.items())}
            for step, series in self._steps.items()
        }

    def queue_state(self, queue: str) -> dict[str, Any]:
        """JSON-ready figures of one queue (``None`` where unknown)."""
        history = self._history[queue]
        info = history.info
        return {
            "queue": queue,
            "dead_letter": self.dead_letter(queue),
            "depth": info.depth if info else None,
            "dead_letter_depth": info.dead_letter_depth if info else None,
            "in_flight": info.in_flight if info else None,
            "consumers": info.consumers if info else None,
            "error": self.scrub(info.error) if info and info.error else None,
            "depth_rate": history.depth.rate(),
            "dead_letter_rate": history.dead_letters.rate(),
            "rates": {name: series.rate(counter=True) for name, series in sorted(history.counters.items())},
            "history": history.depth.tail(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Every queue's figures, when they were read and what went wrong, as JSON-ready data."""
        return {
            "sampled_at": self.sampled_at,
            "refresh": self.refresh,
            "error": self.error,
            "metrics_error": self.metrics_error,
            "queues": {queue: self.queue_state(queue) for queue in self.queues},
        }

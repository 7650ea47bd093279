"""Which task calls travel together: bundles sized by what a task's run time is known to be.

A no-op task's round trip is nearly all broker work (publish, confirm, delivery, ack, and on RabbitMQ a
persistent write), so the task client packs calls of one task that are due in the same loop turn into
bundles (:mod:`taskstream.bundles`). A bundle is taken by one worker, so bundling long calls would pile them on
one worker while others idle. The client therefore learns each task's run time from its replies (a moving
average of ``finished_at - started_at``) and bundles

==========================================  =================================================================
the task                                    calls per broker message
==========================================  =================================================================
has not replied to this client yet          up to :data:`BUNDLE_UNKNOWN` (8): a first burst is spread still
runs under :data:`SHORT_RUN` on average     up to :data:`BUNDLE_SHORT` (64)
runs longer                                 1: every call is its own message, free to go to any worker
==========================================  =================================================================

A bundle also stays under :func:`taskstream.bundles.bundle_limit` bytes; calls too large or too deep for a
bundle (:func:`taskstream.bundles.fits`) go alone. A lone call (sequential round trips) is never bundled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from taskstream.brokers.base import OutgoingMessage
from taskstream.bundles import fits, packed, split

__all__ = ["BUNDLE_SHORT", "BUNDLE_UNKNOWN", "SHORT_RUN", "Bundler"]

BUNDLE_UNKNOWN = 8
BUNDLE_SHORT = 64
SHORT_RUN = 0.002  # seconds
RUN_TIME_WEIGHT = 0.2  # weight of the newest run time in a task's moving average

T = TypeVar("T")


class Bundler:
    """Packs the calls due on one queue into broker messages, and learns each task's run time."""

    def __init__(self) -> None:
        self.run_times: dict[str, float] = {}
        """Task name -> moving average of its run time in seconds, from the replies seen."""

    def size_for(self, name: str) -> int:
        """How many calls of task ``name`` one broker message may carry."""
        run_time = self.run_times.get(name)
        if run_time is None:
            return BUNDLE_UNKNOWN
        return BUNDLE_SHORT if run_time < SHORT_RUN else 1

    def learn(self, name: str, started_at: float | None, finished_at: float | None) -> None:
        """Fold one reply's run time into task ``name``'s average."""
        if started_at is None or finished_at is None:
            return
        took = max(0.0, finished_at - started_at)
        known = self.run_times.get(name)
        self.run_times[name] = took if known is None else known + RUN_TIME_WEIGHT * (took - known)

    def plan(
        self, calls: Sequence[tuple[OutgoingMessage, str, T]], max_bytes: int
    ) -> list[tuple[OutgoingMessage, list[T]]]:
        """The broker messages for ``calls`` (message, task name, what it carries), each with what it carries."""
        wire: list[tuple[OutgoingMessage, list[T]]] = []
        by_task: dict[str, list[tuple[OutgoingMessage, T]]] = {}
        for message, name, item in calls:
            if self.size_for(name) <= 1 or not fits(message):
                wire.append((message, [item]))
            else:
                by_task.setdefault(name, []).append((message, item))
        for name, bundled in by_task.items():
            wire.extend(packed(group) for group in split(bundled, max_bytes, self.size_for(name)))
        return wire

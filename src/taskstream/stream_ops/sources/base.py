"""The Source protocol: an async generator of batches, pulled by the runtime.

A source yields :class:`SourceBatch` objects. The runtime asks for the next batch only after the previous one
went through the whole stage and what it produced was published downstream, then calls ``batch.ack()``: so a
slow sink slows the source (bounded memory), and a source backed by a queue acks a message only after its
results are safe.

A source with a position (``resumable = True``: list and iterable index, JSON Lines offset, simulated
sensor sequence) says in each batch's ``position`` where the batch ends, as JSON data. A stage replica commits
that position with its snapshot, after the batch's outputs were published, and a restarted replica opens the
source with :meth:`Source.open_batches` at the committed position: it goes on where it was instead of replaying
from the start. Sources without one (ZeroMQ, HTTP polling, async iterables, the camera) cannot be replayed:
after a restart they give whatever comes next. A ``QueueSource``'s position is its queue (unacked messages
return).

Every source can be bounded: ``max_items`` (stop after that many items) and ``idle_timeout`` (stop when no item
came for that many seconds). A source ends by returning; the runtime then sends end-of-stream downstream.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Self

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.runtime_context import RuntimeContext

__all__ = ["STOP_BODY", "Source", "SourceBatch", "is_stop"]

STOP_BODY = {"control": "stop"}


def is_stop(value: Any) -> bool:
    """True for the stop marker ``{"control": "stop"}`` that ends a source reading raw data."""
    return type(value) is dict and value.get("control") == "stop" and len(value) == 1


@dataclass(slots=True)
class SourceBatch:
    """Items read together; ``ack`` (when set) is awaited once they were processed and published.

    ``position`` (resumable sources) is where the source stands after these items, as JSON data. ``ids`` (sources
    whose items have ids of their own, like a queue's message ids) name each item for good: records derived from it
    keep that lineage across restarts and runs, so a redelivered message is recognised downstream.
    """

    items: list[Any]
    ack: Callable[[], Awaitable[None]] | None = None
    position: Any = None
    ids: list[str | None] | None = None


class Source(abc.ABC):
    """Base of every source. Subclasses implement :meth:`batches`."""

    label = "source"
    #: True when the source applies ``idle_timeout`` itself (sources whose batches carry acks must: the
    #: runtime's generic timeout would cancel the source while a batch of it is still being processed).
    handles_idle = False

    def __init__(self, *, max_items: int | None = None, idle_timeout: float | None = None) -> None:
        self.max_items: int | None = None
        self.idle_timeout: float | None = None
        self.bounded(max_items=max_items, idle_timeout=idle_timeout)

    def bounded(self, *, max_items: int | None = None, idle_timeout: float | None = None) -> Self:
        """Stop after ``max_items`` items and/or after ``idle_timeout`` seconds without an item."""
        if max_items is not None and max_items < 0:
            raise ConfigurationError(f"max_items must be >= 0, got {max_items}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ConfigurationError(f"idle_timeout must be positive, got {idle_timeout}")
        if max_items is not None:
            self.max_items = max_items
        if idle_timeout is not None:
            self.idle_timeout = idle_timeout
        return self

    def room(self, emitted: int, batch_size: int) -> int:
        """How many items the next batch may hold given ``max_items`` (0 means: stop now)."""
        if self.max_items is None:
            return batch_size
        return max(0, min(batch_size, self.max_items - emitted))

    #: True when the source's batches carry a ``position`` it can be reopened at (see the module docstring).
    resumable = False

    @abc.abstractmethod
    def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        """Yield batches of at most ``batch_size`` items until the source ends."""

    def open_batches(self, ctx: RuntimeContext, batch_size: int, position: Any = None) -> AsyncIterator[SourceBatch]:
        """:meth:`batches`, starting after ``position`` (a batch's ``position``) when given.

        Resumable sources override this; the others start wherever they are (they cannot be replayed).
        """
        return self.batches(ctx, batch_size)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

"""What a running node can reach: names, the broker, the time source, counters."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from taskstream.errors import ConfigurationError
from taskstream.payloads.claimcheck import ClaimCheck

if TYPE_CHECKING:
    from taskstream.brokers.base import Broker

__all__ = ["NodeStats", "RuntimeContext"]


@dataclass(slots=True)
class NodeStats:
    """Counters of one step in one runtime."""

    items_in: int = 0
    items_out: int = 0
    late: int = 0
    dead_lettered: int = 0


@dataclass
class RuntimeContext:
    """Given to every node when a runtime (fused run or one stage replica) opens it.

    Attributes:
        pipeline: the pipeline's name.
        stage: the stage this runtime runs (``None`` when fused).
        replica: replica index within the stage (0 when fused).
        broker: the connected broker (queue sources and sinks, services, dead letters).
        now: the time source, seconds since the epoch; tests inject a fake one.
        stats: counters per step id.
        claim_check: where records too large for a broker go (queue sources and sinks); ``None``: from settings.
    """

    pipeline: str
    stage: str | None = None
    replica: int = 0
    broker: Broker | None = None
    now: Callable[[], float] = time.time
    stats: dict[str, NodeStats] = field(default_factory=dict)
    claim_check: ClaimCheck | None = None

    def payloads(self) -> ClaimCheck:
        """The claim-check for this runtime (built from settings on first use when none was given)."""
        if self.claim_check is None:
            self.claim_check = ClaimCheck.from_settings()
        return self.claim_check

    def node_stats(self, node_id: str) -> NodeStats:
        stats = self.stats.get(node_id)
        if stats is None:
            stats = self.stats[node_id] = NodeStats()
        return stats

    async def queue_broker(self, given: str | Broker | None, who: str) -> tuple[Broker, bool]:
        """The broker a queue source or sink uses: ``given`` (an instance, or a URL connected here), else the
        runtime's. Returns it and whether the caller owns it (and closes it when done).

        Raises:
            ConfigurationError: nothing given and the runtime has no broker; ``who`` names the step.
        """
        from taskstream.brokers.base import Broker, broker_from_url

        if isinstance(given, Broker):
            return given, False
        if isinstance(given, str):
            broker = broker_from_url(given)
            await broker.connect()
            return broker, True
        if self.broker is not None:
            return self.broker, False
        raise ConfigurationError(f"{who} has no broker: pass broker= or run on one")

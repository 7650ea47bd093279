"""``AppContext``: the parts of an App that its runtimes and components use, and nothing else.

The App builds one (``app.context``) and hands it to the task runtime and to every component's
``start(context)``; they never see the App itself. Pipelines and services read only ``broker``; the task
runtime, worker and client read the rest.

Not to be confused with :class:`taskstream.stream_ops.runtime_context.RuntimeContext`, which a stream step
receives (its stage, replica and clock).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskstream.brokers.base import Broker
    from taskstream.observe.metrics import Recorder
    from taskstream.payloads.claimcheck import ClaimCheck
    from taskstream.producer import Producer
    from taskstream.settings import Settings
    from taskstream.tasks.stores.base import ResultStore

__all__ = ["AppContext", "Lifecycle"]

Lifecycle = Callable[[], Coroutine[Any, Any, None]]
"""An App's ``start`` or ``stop``: what the sync entry point runs on the background loop."""


@dataclass(frozen=True, slots=True)
class AppContext:
    """What an App lends its runtimes: connections, limits, where results and metrics go.

    Attributes:
        broker: the App's broker (connected by the App before any component starts).
        producer: the App's publish path (encoding, size checks, claim-check offload, tracing).
        settings: the App's settings.
        metrics: where metrics go (a no-op recorder when they are off).
        result_store: the result store the App was given: a URL, a store, or ``None`` for the default
            (``settings.result_store_url``, else memory on the memory broker and SQLite on real ones).
        start: starts the App (the task runtime calls it when sync code submits to an App nobody started).
        stop: stops the App (the task runtime calls it on ``app.close()`` and at interpreter exit).
    """

    broker: Broker
    producer: Producer
    settings: Settings
    metrics: Recorder
    result_store: str | ResultStore | None
    start: Lifecycle
    stop: Lifecycle

    @property
    def claim_check(self) -> ClaimCheck:
        """Where large payloads go and come back from (the producer's claim-check)."""
        return self.producer.claim_check

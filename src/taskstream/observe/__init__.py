"""See what runs: queue figures and dead letters on every broker (``taskstream queues``, ``taskstream dlq``).

:mod:`taskstream.observe.queues` reads depth, dead-letter depth and (where the broker says) in-flight counts;
:mod:`taskstream.observe.dlq` lists, shows, replays and purges dead letters without losing any. Both are async
functions over a connected broker, for scripts and consoles; :mod:`taskstream.observe.cli` is the thin CLI.

:mod:`taskstream.observe.metrics` records Prometheus metrics on the message path (``App(metrics=True)``) and
:mod:`taskstream.observe.tracing` carries OpenTelemetry trace context in message headers; both cost nothing
while off.
"""

from taskstream.observe.dlq import (
    DeadLetter,
    DeadLetterNotFound,
    ReplayResult,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    replay_headers,
)
from taskstream.observe.metrics import Recorder, recorder_for
from taskstream.observe.queues import QueueInfo, app_queues, inspect_queues, queue_info
from taskstream.observe.tracing import Tracing, tracing_for

__all__ = [
    "DeadLetter",
    "DeadLetterNotFound",
    "QueueInfo",
    "Recorder",
    "ReplayResult",
    "Tracing",
    "app_queues",
    "get_dead_letter",
    "inspect_queues",
    "list_dead_letters",
    "purge_dead_letters",
    "queue_info",
    "recorder_for",
    "replay_dead_letters",
    "replay_headers",
    "tracing_for",
]

"""See what runs: queue figures and dead letters on every broker (``taskstream queues``, ``taskstream dlq``).

:mod:`taskstream.observe.queues` reads depth, dead-letter depth and (where the broker says) in-flight counts;
:mod:`taskstream.observe.dlq` lists, shows, replays and purges dead letters without losing any. Both are async
functions over a connected broker, for scripts and consoles; :mod:`taskstream.observe.cli` is the thin CLI.
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
from taskstream.observe.queues import QueueInfo, app_queues, inspect_queues, queue_info

__all__ = [
    "DeadLetter",
    "DeadLetterNotFound",
    "QueueInfo",
    "ReplayResult",
    "app_queues",
    "get_dead_letter",
    "inspect_queues",
    "list_dead_letters",
    "purge_dead_letters",
    "queue_info",
    "replay_dead_letters",
    "replay_headers",
]

"""A live web console: queues, dead letters (replay, purge), tasks by id and pipeline graphs (``taskstream console``).

An aiohttp.web server renders the pages (jinja2 templates, package data); a small script refreshes their
figures from JSON endpoints every ``refresh`` seconds. No JavaScript build step. A :class:`Sampler` reads
every queue's depth on its own broker connection and derives rates from the changes (and, given
``--metrics-url``, from the per-queue ``taskstream_*_total`` counters); dead letters are read and replayed
with :mod:`taskstream.observe.dlq`; tasks come from the result store; pipeline graphs from
:mod:`taskstream.stream_ops.drawing`. URLs are shown only redacted. Needs ``pip install 'taskstream[console]'``.

Example:
    >>> from taskstream.observe.console import config_for, run_console
    >>> config = config_for("amqp://guest:guest@127.0.0.1:5672/", queues=["orders.in"])
    >>> # asyncio.run(run_console(config))  # serves http://127.0.0.1:8089/ until Ctrl-C
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskstream.observe.console.config import ConsoleConfig, config_for
    from taskstream.observe.console.sampler import Sampler
    from taskstream.observe.console.server import build_console, run_console

__all__ = ["ConsoleConfig", "Sampler", "build_console", "config_for", "run_console"]

_HOMES = {
    "ConsoleConfig": "config",
    "config_for": "config",
    "Sampler": "sampler",
    "build_console": "server",
    "run_console": "server",
}


def __getattr__(name: str) -> Any:
    """Import on first use, so ``taskstream --help`` works without the console's extra."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)

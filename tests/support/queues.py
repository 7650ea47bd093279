"""Removing a test's queues from a shared broker once the test is done."""

from __future__ import annotations

import asyncio
import contextlib

from taskstream.brokers.base import broker_from_url

__all__ = ["delete_queues", "delete_queues_sync"]


async def delete_queues(url: str, *queues: str) -> None:
    """Delete ``queues`` and their dead-letter queues on the broker at ``url`` (one already gone is fine)."""
    async with broker_from_url(url) as broker:
        for queue in queues:
            for name in (queue, broker.dead_letter_name(queue)):
                with contextlib.suppress(Exception):
                    await broker.delete_queue(name)


def delete_queues_sync(url: str, *queues: str) -> None:
    """:func:`delete_queues` for code without an event loop."""
    asyncio.run(delete_queues(url, *queues))

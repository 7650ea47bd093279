"""The tasks that feed a runner's inbox: one per source, one for the stage's queue.

Each puts ``("source", node_id, batch)`` / ``("source-end", node_id)`` or ``("deliveries", [Delivery, ...])`` /
``("queue-end",)`` on the inbox, and ``("error", exc)`` when its input fails, so the runner's loop alone decides
what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from taskstream.brokers.base import Subscription
from taskstream.stream_ops.sources.base import Source, SourceBatch

__all__ = ["read_queue", "read_source"]

log = logging.getLogger("taskstream.stream_ops")


async def read_source(
    node_id: str, source: Source, batches: AsyncIterator[SourceBatch], inbox: asyncio.Queue[tuple[Any, ...]]
) -> None:
    """Put the batches of ``source`` (already opened as ``batches``) on ``inbox`` until it ends or idles out."""
    try:
        while True:
            if source.idle_timeout is not None and not source.handles_idle:
                batch = await asyncio.wait_for(anext(batches), source.idle_timeout)
            else:
                batch = await anext(batches)
            await inbox.put(("source", node_id, batch))
    except StopAsyncIteration:
        pass
    except TimeoutError:
        log.info("source %r idle for %s s: ending it", node_id, source.idle_timeout)
    except Exception as exc:
        await inbox.put(("error", exc))
        return
    finally:
        with contextlib.suppress(Exception):
            await batches.aclose()  # type: ignore[attr-defined]
    await inbox.put(("source-end", node_id))


async def read_queue(
    subscription: Subscription,
    inbox: asyncio.Queue[tuple[Any, ...]],
    size: int,
    linger: float,
    max_bytes: int | None = None,
) -> None:
    """Put deliveries on ``inbox`` in batches of up to ``size`` (and ``max_bytes`` of bodies, the delivery that
    crosses it included), gathered for at most ``linger`` seconds."""
    try:
        while True:
            batch = [await subscription.__anext__()]
            held = len(batch[0].body)
            deadline = time.monotonic() + linger
            while len(batch) < size and (max_bytes is None or held < max_bytes):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        batch.append(await subscription.__anext__())
                    held += len(batch[-1].body)
                except TimeoutError:
                    break
            await inbox.put(("deliveries", batch))
    except StopAsyncIteration:
        await inbox.put(("queue-end",))
    except Exception as exc:
        await inbox.put(("error", exc))

"""A consumer in a process of its own, for the contract test of a consumer that dies holding a message.

``python -m tests.brokers.contract.holder URL QUEUE`` receives one message from ``QUEUE`` on the broker at
``URL``, keeps it invisible the way a live consumer's runtime does (``extend``, where the broker has a
visibility timeout), prints ``{"message_id": ..., "attempt": ...}`` on one line, then holds the message unacked
and extended for as long as it lives. The test then kills it: only the death can free the message.
"""

from __future__ import annotations

import asyncio
import json
import sys

from taskstream.brokers.base import broker_from_url


async def hold(url: str, queue: str) -> None:
    broker = broker_from_url(url)
    await broker.connect()
    subscription = broker.consume(queue, prefetch=1)
    delivery = await subscription.__anext__()
    timeout = broker.capabilities.visibility_timeout
    if timeout is not None:
        await delivery.extend(timeout)  # held the way a live consumer holds it before the test may kill it
    print(json.dumps({"message_id": delivery.message_id, "attempt": delivery.attempt}), flush=True)
    while True:  # never acks, never closes: it ends only by being killed
        if timeout is None:
            await asyncio.sleep(3600)
        else:
            await asyncio.sleep(timeout / 4)
            await delivery.extend(timeout)


if __name__ == "__main__":
    asyncio.run(hold(sys.argv[1], sys.argv[2]))

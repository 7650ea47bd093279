"""Multi-ack batching: the acks settled in one loop turn go out as one ``multiple=True`` ack.

A channel's delivery tags are acked in order: the contiguous run from the oldest unsettled tag is one
``basic.ack(multiple=True)``; tags acked out of order go one by one and are remembered, so a later multiple ack
skips them. AMQP never confirms acks: an ack is done once its frame is handed to the connection, and a channel
lost just then means a redelivery.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import aiormq

from taskstream.brokers.rabbitmq.channels import ChannelGuard

__all__ = ["AckBatcher"]

log = logging.getLogger("taskstream.brokers.rabbitmq")


class AckBatcher:
    """The unsettled delivery tags of one subscription's current channel, and the acks waiting to be sent.

    Args:
        queue: the subscription's queue (for log lines).
        guard: interrupts an ack blocked on a channel that died.
    """

    def __init__(self, queue: str, guard: ChannelGuard) -> None:
        self.queue = queue
        self._guard = guard
        self._channel: aiormq.abc.AbstractChannel | None = None
        # delivery tags of the current channel not yet acked on the wire, in delivery order
        self._outstanding: collections.deque[int] = collections.deque()
        self._to_ack: set[int] = set()
        self._gone: set[int] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_done: asyncio.Future[None] | None = None

    def reset(self, channel: aiormq.abc.AbstractChannel) -> None:
        """Start over on a new channel (tags of the old one mean nothing there)."""
        self._channel = channel
        self._outstanding.clear()
        self._to_ack.clear()
        self._gone.clear()

    def received(self, tag: int) -> None:
        """A delivery arrived on the current channel."""
        self._outstanding.append(tag)

    def settled(self, tag: int) -> None:
        """``tag`` was settled on the wire by itself (rejected, nacked or acked alone)."""
        self._gone.add(tag)

    def ack(self, tag: int) -> asyncio.Future[None]:
        """Queue an ack of ``tag``; the returned future resolves once it is handed to the connection."""
        self._to_ack.add(tag)
        written = self._flush_done
        if written is None:
            loop = asyncio.get_running_loop()
            written = self._flush_done = loop.create_future()
            self._flush_task = loop.create_task(self._flush(written))
        return written

    async def drain(self) -> None:
        """Wait until the acks queued so far are written (or lost with their channel)."""
        if self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)

    def _contiguous_top(self, to_ack: set[int]) -> int:
        """Take the run of settled tags at the head of ``_outstanding``; returns its last tag to ack (0: none)."""
        outstanding, gone = self._outstanding, self._gone
        top = 0
        while outstanding:
            head = outstanding[0]
            if head in to_ack:
                top = head
                to_ack.discard(head)
            elif head in gone:
                gone.discard(head)
            else:
                break
            outstanding.popleft()
        return top

    async def _flush(self, written: asyncio.Future[None]) -> None:
        """Send the acks settled during this loop turn: one ``multiple`` ack for the contiguous prefix."""
        try:
            await asyncio.sleep(0)
            while self._to_ack:
                channel = self._channel
                to_ack, self._to_ack = self._to_ack, set()
                if channel is None or channel.is_closed:
                    return
                top = self._contiguous_top(to_ack)
                if top:
                    await self._guard.wait(channel, channel.basic_ack(top, multiple=True, wait=False))
                for tag in sorted(to_ack):
                    # acked out of order: the head is still held; ack alone, remember it is gone
                    await self._guard.wait(channel, channel.basic_ack(tag, wait=False))
                    self._gone.add(tag)
        except Exception as exc:  # the channel died: the broker redelivers what we could not ack
            log.warning("acks on RabbitMQ queue %r were lost (%s); the broker redelivers", self.queue, exc)
        finally:
            self._flush_task = None
            self._flush_done = None
            if not written.done():
                written.set_result(None)

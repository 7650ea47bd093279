"""The topic forwarder: an XSUB/XPUB proxy for no-ack pub/sub, with drops counted instead of silent.

Publishers (:class:`~taskstream.brokers.zeromq.TopicPublisher`) connect to the frontend, subscribers
(:class:`~taskstream.brokers.zeromq.TopicSubscriber`) to the backend; topic filters are ZeroMQ prefix filters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import zmq
import zmq.asyncio

from taskstream.brokers.zeromq.config import DEFAULT_PUBSUB_HWM, check_endpoint
from taskstream.brokers.zeromq.protocol import DRAIN, recv_nowait, send_nowait
from taskstream.errors import BrokerConnectionError

__all__ = ["Forwarder", "ForwarderStats"]

log = logging.getLogger("taskstream.zmq.device")


@dataclass(slots=True)
class ForwarderStats:
    """Counters of a :class:`Forwarder`: messages passed on, messages dropped at the high-water mark, and
    the subscription prefixes currently held (prefix -> subscriber count as seen by the XPUB)."""

    forwarded: int = 0
    dropped: int = 0
    subscriptions: dict[bytes, int] = field(default_factory=dict)


class Forwarder:
    """XSUB/XPUB proxy for topic pub/sub: publishers connect to ``frontend``, subscribers to ``backend``.

    Drops are counted, never silent: the backend runs with ``XPUB_NODROP``, a message a subscriber's pipe
    cannot take is counted in ``stats.dropped``.

    Args:
        frontend: endpoint publishers connect to (``tcp://127.0.0.1:*`` picks a free port).
        backend: endpoint subscribers connect to.
        hwm: high-water mark (messages) of both sockets.
    """

    def __init__(self, frontend: str, backend: str, *, hwm: int = DEFAULT_PUBSUB_HWM) -> None:
        self.frontend = check_endpoint(frontend)
        self.backend = check_endpoint(backend)
        self.hwm = hwm
        self.stats = ForwarderStats()
        self.frontend_endpoint = ""
        self.backend_endpoint = ""
        self._ctx: zmq.asyncio.Context | None = None
        self._xsub: zmq.asyncio.Socket | None = None
        self._xpub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Bind both sides and start forwarding on the running loop."""
        if self._ctx is not None:
            return
        ctx = zmq.asyncio.Context()
        xsub = ctx.socket(zmq.XSUB)
        xpub = ctx.socket(zmq.XPUB)
        for sock in (xsub, xpub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.setsockopt(zmq.RCVHWM, self.hwm)
        xpub.setsockopt(zmq.XPUB_NODROP, 1)
        endpoint = self.frontend
        try:
            xsub.bind(self.frontend)
            endpoint = self.backend
            xpub.bind(self.backend)
        except zmq.ZMQError as exc:
            xsub.close(0)
            xpub.close(0)
            ctx.term()
            raise BrokerConnectionError(f"the zmq forwarder cannot bind {endpoint!r}: {exc}") from exc
        self.frontend_endpoint = xsub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ctx, self._xsub, self._xpub = ctx, xsub, xpub
        self._tasks = [
            asyncio.create_task(self._forward(), name="zmq-forwarder:data"),
            asyncio.create_task(self._subscriptions(), name="zmq-forwarder:subscriptions"),
        ]
        log.info("zmq forwarder: publishers -> %s, subscribers -> %s", self.frontend_endpoint, self.backend_endpoint)

    async def stop(self) -> None:
        """Stop forwarding and close both sockets."""
        if self._ctx is None:
            return
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        assert self._xsub is not None and self._xpub is not None
        self._xsub.close(0)
        self._xpub.close(0)
        self._ctx.term()
        self._ctx = self._xsub = self._xpub = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _forward(self) -> None:
        assert self._xsub is not None and self._xpub is not None
        xsub = self._xsub
        xpub = self._xpub
        stats = self.stats
        while True:
            frames = await xsub.recv_multipart()
            for _ in range(DRAIN):
                try:
                    send_nowait(xpub, frames)
                    stats.forwarded += 1
                except zmq.Again:
                    stats.dropped += 1
                try:
                    frames = recv_nowait(xsub)
                except zmq.Again:
                    break

    async def _subscriptions(self) -> None:
        assert self._xsub is not None and self._xpub is not None
        xpub, xsub = self._xpub, self._xsub
        subscriptions = self.stats.subscriptions
        while True:
            message = await xpub.recv()
            # a subscription message: 1 (subscribe) or 0 (unsubscribe), then the prefix; passed on upstream
            if message[:1] == b"\x01":
                subscriptions[message[1:]] = subscriptions.get(message[1:], 0) + 1
            elif message[:1] == b"\x00":
                left = subscriptions.get(message[1:], 0) - 1
                if left > 0:
                    subscriptions[message[1:]] = left
                else:
                    subscriptions.pop(message[1:], None)
            await xsub.send(message)

"""A ZeroMQ SUB socket as a source.

Messages are one frame (the payload) or several (topic frames first, payload last). Payloads are decoded as
JSON when they parse, else kept as bytes. With ``with_topic=True`` items are keyed ``(topic, payload)`` tuples.
A ``{"control": "stop"}`` payload ends the source. ZeroMQ PUB/SUB drops messages a slow subscriber cannot take
(past the high-water mark) and whatever was sent before the subscription was made: that is ZeroMQ's contract.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from taskstream.errors import ConfigurationError
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch, is_stop

__all__ = ["ZmqSubSource"]


class ZmqSubSource(Source):
    """Subscribe to ``topics`` on ``endpoint`` (``connect`` by default, ``bind=True`` to bind).

    Args:
        endpoint: e.g. ``tcp://127.0.0.1:5556``.
        topics: topic prefixes; ``("",)`` subscribes to everything.
        bind: bind instead of connect.
        with_topic: emit ``(topic, payload)`` instead of the payload.
        hwm: receive high-water mark.
    """

    label = "zmq-sub"

    def __init__(
        self,
        endpoint: str,
        *,
        topics: Sequence[str] = ("",),
        bind: bool = False,
        with_topic: bool = False,
        hwm: int = 10_000,
        **bounds: Any,
    ) -> None:
        super().__init__(**bounds)
        if "://" not in endpoint:
            raise ConfigurationError(f"ZeroMQ endpoint {endpoint!r} needs a transport, e.g. tcp://127.0.0.1:5556")
        self.endpoint = endpoint
        self.topics = list(topics)
        self.bind = bind
        self.with_topic = with_topic
        self.hwm = hwm

    @staticmethod
    def _decode(payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        try:
            import zmq
            import zmq.asyncio
        except ImportError as exc:  # pragma: no cover
            raise ConfigurationError("ZmqSubSource needs pyzmq: pip install 'taskstream[zmq]'") from exc
        context = zmq.asyncio.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, self.hwm)
        socket.setsockopt(zmq.LINGER, 0)
        for topic in self.topics:
            socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            if self.bind:
                socket.bind(self.endpoint)
            else:
                socket.connect(self.endpoint)
            emitted = 0
            while True:
                room = self.room(emitted, batch_size)
                if room == 0:
                    return
                frames = [await socket.recv_multipart()]
                while len(frames) < room:
                    try:
                        frames.append(await socket.recv_multipart(flags=zmq.NOBLOCK))
                    except zmq.Again:
                        break
                items: list[Any] = []
                stop = False
                for parts in frames:
                    payload = self._decode(parts[-1])
                    if is_stop(payload):
                        stop = True
                        break
                    if self.with_topic:
                        topic = parts[0].decode("utf-8", "replace") if len(parts) > 1 else ""
                        items.append((topic, payload))
                    else:
                        items.append(payload)
                if items:
                    emitted += len(items)
                    yield SourceBatch(items)
                if stop:
                    return
        finally:
            socket.close(linger=0)

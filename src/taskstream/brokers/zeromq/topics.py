"""Topic pub/sub through the forwarder, without acks: losses are counted at each hop instead.

:class:`TopicPublisher` numbers its messages per topic; :class:`TopicSubscriber` finds the gaps
(``TopicPublisher.dropped``, ``Forwarder.stats.dropped``, ``TopicSubscriber.missed``) and skips what it cannot
read (``TopicSubscriber.malformed``). Plain pyzmq PUB and SUB sockets interoperate with both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import orjson
import zmq
import zmq.asyncio

from taskstream.brokers.zeromq.config import DEFAULT_PUBSUB_HWM, check_endpoint
from taskstream.brokers.zeromq.protocol import send_nowait
from taskstream.errors import BrokerConnectionError, ConfigurationError
from taskstream.messages import new_id

__all__ = ["DEFAULT_MAX_STREAMS", "TopicMessage", "TopicPublisher", "TopicSubscriber"]

log = logging.getLogger("taskstream.zmq")

#: (publisher, topic) streams whose last sequence number a :class:`TopicSubscriber` remembers.
DEFAULT_MAX_STREAMS = 10_000


@dataclass(frozen=True, slots=True)
class TopicMessage:
    """One message received by a :class:`TopicSubscriber`."""

    topic: str
    body: bytes
    headers: dict[str, Any]
    publisher: str
    seq: int


class TopicPublisher:
    """Publishes ``(topic, body)`` to a forwarder's frontend. No acks: PUB/SUB semantics, with losses counted.

    The socket is an XPUB with ``XPUB_NODROP``: at the high-water mark a send fails instead of vanishing, and
    the publisher either counts the message in :attr:`dropped` (``on_full="drop"``, the default: a publisher
    never blocks) or waits for room (``on_full="block"``). Every message carries this publisher's id and a
    sequence number, so subscribers see gaps. The XPUB also sees subscriptions: :meth:`wait_subscribed` waits
    until someone listens to a topic, so nothing published after it is lost to a late joiner.

    Args:
        endpoint: the forwarder's frontend (``tcp://...`` or ``ipc://...``).
        hwm: send high-water mark (messages).
        on_full: ``"drop"`` (count and go on) or ``"block"`` (wait for room).
        name: publisher id carried by every message (a random id by default).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int = DEFAULT_PUBSUB_HWM,
        on_full: Literal["drop", "block"] = "drop",
        name: str | None = None,
    ) -> None:
        if on_full not in ("drop", "block"):
            raise ConfigurationError(f"on_full must be 'drop' or 'block', got {on_full!r}")
        self.endpoint = check_endpoint(endpoint)
        self.hwm = hwm
        self.on_full = on_full
        self.name = name or new_id()[:12]
        self.sent = 0
        self.dropped = 0
        self._seq: dict[str, int] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._subscribed: set[bytes] = set()
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Connect to the forwarder (ZeroMQ connects in the background; see :meth:`wait_subscribed`)."""
        if self._sock is not None:
            return
        sock = zmq.asyncio.Context.instance().socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 1000)  # let queued messages out on close
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise BrokerConnectionError(f"cannot connect to the forwarder at {self.endpoint}: {exc}") from exc
        self._sock = sock
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read_subscriptions(), name=f"zmq-pub:{self.name}")

    async def close(self) -> None:
        """Close the socket (queued messages get up to one second to leave)."""
        if self._sock is None:
            return
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close()
        self._sock = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _read_subscriptions(self) -> None:
        assert self._sock is not None
        while True:
            message = await self._sock.recv()
            # an XPUB reads subscriptions as one frame: 1 (subscribe) or 0 (unsubscribe), then the prefix
            if message[:1] == b"\x01":
                self._subscribed.add(message[1:])
            elif message[:1] == b"\x00":
                self._subscribed.discard(message[1:])
            self._changed.set()

    def is_subscribed(self, topic: str) -> bool:
        """True if some subscriber's prefix filter matches ``topic``."""
        data = topic.encode()
        return any(data.startswith(prefix) for prefix in self._subscribed)

    async def wait_subscribed(self, *topics: str, timeout: float = 10.0) -> None:
        """Wait until every one of ``topics`` has a subscriber; :class:`BrokerConnectionError` after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while not all(self.is_subscribed(t) for t in topics):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            missing = [t for t in topics if not self.is_subscribed(t)]
            raise BrokerConnectionError(
                f"no subscriber for {missing} through the forwarder at {self.endpoint} within {timeout} s"
            ) from None

    async def publish(self, topic: str, body: bytes, *, headers: Mapping[str, Any] | None = None) -> bool:
        """Send one message; True if it left, False if it was dropped (and counted) at the high-water mark."""
        if self._sock is None:
            raise BrokerConnectionError("topic publisher is not connected (use 'async with' or connect())")
        seq = self._seq[topic] = self._seq.get(topic, 0) + 1
        # three frames: topic (for the prefix filters), header [publisher, seq, headers], body
        frames = [topic.encode(), orjson.dumps([self.name, seq, dict(headers) if headers else {}]), body]
        try:
            send_nowait(self._sock, frames)
        except zmq.Again:
            if self.on_full == "drop":
                self.dropped += 1
                return False
            await self._sock.send_multipart(frames)
        self.sent += 1
        return True


class _Malformed(Exception):
    """A message a :class:`TopicSubscriber` cannot read: ``kind`` names what was wrong, ``detail`` how."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(detail)


def _decode_topic(frame: bytes) -> str:
    try:
        return frame.decode()
    except UnicodeDecodeError:
        raise _Malformed("topic", "the topic frame is not UTF-8") from None


def _decode_header(frame: bytes) -> tuple[str, int, dict[str, Any]]:
    """``[publisher, seq, headers]`` from a :class:`TopicPublisher` header frame, checked."""
    try:
        header = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise _Malformed("header", "the header frame is not JSON") from None
    if not isinstance(header, list) or len(header) != 3:
        raise _Malformed("header shape", f"the header is a {type(header).__name__}, not [publisher, seq, headers]")
    publisher, seq, headers = header
    if not isinstance(publisher, str) or type(seq) is not int or seq < 1 or not isinstance(headers, dict):
        raise _Malformed(
            "header types",
            "the header is not [string, positive integer, object] but "
            f"[{type(publisher).__name__}, {type(seq).__name__}, {type(headers).__name__}]",
        )
    return publisher, seq, headers


class TopicSubscriber:
    """Receives messages whose topic starts with one of ``topics`` from a forwarder's backend.

    Iterate it (``async for message in subscriber``) or call :meth:`recv`. :attr:`missed` counts messages lost
    on the way, found as gaps in each publisher's sequence numbers per topic. The last sequence number is
    remembered for the ``max_streams`` (publisher, topic) pairs heard from most recently; once a pair has been
    forgotten, a pair seen for the first time starts its count at the number it arrives with (it may be a
    forgotten one coming back), so gaps before its first message are not counted.

    Plain ZeroMQ publishers feed it too: a two-frame ``[topic, body]`` message, or a one-frame message whose
    topic is its first word (``b"5 21.5"``: topic ``"5"``, body the whole frame). They carry no headers and
    no sequence numbers (``publisher`` is ``""``, ``seq`` 0), so their losses cannot be counted.

    A message it cannot read (more than three frames, a topic frame that is not UTF-8, a header frame that is
    not JSON ``[publisher: str, seq: int >= 1, headers: object]``) is skipped and counted in
    :attr:`malformed`, with one warning per kind of fault; the next valid message is returned.

    Args:
        endpoint: the forwarder's backend.
        topics: prefix filters (ZeroMQ semantics: ``"3"`` also matches ``"30"``); ``""`` for everything.
        exact: keep only messages whose topic equals one of ``topics``.
        hwm: receive high-water mark (messages).
        max_streams: (publisher, topic) pairs whose sequence numbers are remembered (least recently heard
            forgotten first); bounds the memory a stream of new publisher ids can take.
    """

    def __init__(
        self,
        endpoint: str,
        topics: Sequence[str],
        *,
        exact: bool = False,
        hwm: int = DEFAULT_PUBSUB_HWM,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if isinstance(topics, str):
            raise ConfigurationError("topics must be a list of prefixes, not one string")
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
            raise ConfigurationError(f"max_streams must be a positive integer, got {max_streams!r}")
        self.endpoint = check_endpoint(endpoint)
        self.topics = list(topics)
        self.exact = exact
        self.hwm = hwm
        self.max_streams = max_streams
        self.received = 0
        self.missed = 0
        self.malformed = 0
        self._last_seq: dict[tuple[str, str], int] = {}  # insertion order = least recently heard first
        self._forgot = False
        self._warned: set[str] = set()
        self._sock: zmq.asyncio.Socket | None = None

    @property
    def tracked_streams(self) -> int:
        """How many (publisher, topic) pairs' sequence numbers are remembered now (at most ``max_streams``)."""
        return len(self._last_seq)

    async def connect(self) -> None:
        """Connect and subscribe."""
        if self._sock is not None:
            return
        sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        for topic in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise BrokerConnectionError(f"cannot connect to the forwarder at {self.endpoint}: {exc}") from exc
        self._sock = sock

    async def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TopicMessage:
        return await self.recv()

    async def recv(self) -> TopicMessage:
        """The next message (wrap in ``asyncio.timeout`` to bound the wait); malformed ones are skipped."""
        if self._sock is None:
            raise BrokerConnectionError("topic subscriber is not connected (use 'async with' or connect())")
        while True:
            frames = await self._sock.recv_multipart()
            try:
                message = self._parse(frames)
            except _Malformed as exc:
                self._skip(exc)
                continue
            if message is not None:
                self.received += 1
                return message

    def _parse(self, frames: list[bytes]) -> TopicMessage | None:
        """The message in ``frames``, or None when ``exact`` filters it out."""
        if len(frames) < 3:  # from a plain ZeroMQ PUB: [topic, body] or one "topic payload" frame
            return self._plain(frames)
        if len(frames) != 3:
            raise _Malformed("frames", f"{len(frames)} frames, where a TopicPublisher sends 3")
        topic = _decode_topic(frames[0])
        publisher, seq, headers = _decode_header(frames[1])
        self._track(publisher, topic, seq)
        if self.exact and topic not in self.topics:
            return None
        return TopicMessage(topic, frames[2], headers, publisher, seq)

    def _track(self, publisher: str, topic: str, seq: int) -> None:
        """Count the gap before ``seq`` in this stream; remember it as the most recently heard."""
        streams = self._last_seq
        stream = (publisher, topic)
        last = streams.pop(stream, None)
        if last is None:
            last = seq - 1 if self._forgot else 0
        if seq > last + 1:
            self.missed += seq - last - 1
        streams[stream] = max(seq, last)
        if len(streams) > self.max_streams:
            del streams[next(iter(streams))]
            self._forgot = True

    def _skip(self, exc: _Malformed) -> None:
        self.malformed += 1
        if exc.kind not in self._warned:
            self._warned.add(exc.kind)
            log.warning(
                "topic subscriber on %s: skipping a malformed message: %s (further ones of this kind are only "
                "counted in TopicSubscriber.malformed)",
                self.endpoint,
                exc.detail,
            )

    def _plain(self, frames: list[bytes]) -> TopicMessage | None:
        """A message from a plain PUB socket: ``[topic, body]``, or one frame whose topic is its first word."""
        if len(frames) == 2:
            topic, body = _decode_topic(frames[0]), frames[1]
        else:  # the first word of a free-form payload: kept readable, never refused
            body = frames[0]
            topic = body.split(b" ", 1)[0].decode(errors="replace")
        if self.exact and topic not in self.topics:
            return None
        return TopicMessage(topic, body, {}, "", 0)

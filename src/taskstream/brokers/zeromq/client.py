"""The ZeroMQ broker: one DEALER connection to the queue device, work queues with acks, credit and heartbeats.

Frames are batched per loop tick (many publishes, acks and nacks per frame); the wire is described in
:mod:`taskstream.brokers.zeromq.protocol`, the guarantees and URL options in ``docs/brokers.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import zmq
import zmq.asyncio

from taskstream.brokers.base import Broker, Capabilities, Delivery, OutgoingMessage, QueueStats, Subscription
from taskstream.brokers.zeromq.config import ZeroMQConfig, check_endpoint, config_from_url, endpoint_from_url
from taskstream.brokers.zeromq.protocol import new_routing_id
from taskstream.brokers.zeromq.pump import SocketPump
from taskstream.errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    MessageTooLarge,
    PublishError,
    QueueNotFound,
)
from taskstream.messages import new_id

__all__ = ["ZeroMQBroker"]

log = logging.getLogger("taskstream.zmq")


def _device_error(kind: str, text: str) -> BrokerError:
    if kind == "QueueNotFound":
        return QueueNotFound(text)
    if kind == "MessageTooLarge":
        with contextlib.suppress(ValueError, TypeError):
            size, limit = orjson.loads(text)
            return _TooLargeAtDevice(int(size), int(limit))
    return PublishError(f"zmq device refused the request: {kind}: {text}")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _TooLargeAtDevice(BrokerError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"{size} > {limit}")


class _ZmqDelivery(Delivery):
    __slots__ = ("_epoch", "_sub", "_tag")

    def __init__(self, sub: _ZmqSubscription, tag: int, attempt: int, meta: list[Any], body: bytes, epoch: int) -> None:
        message_id, headers, key = meta
        super().__init__(
            queue=sub.queue, body=body, headers=headers or {}, message_id=message_id, attempt=attempt, key=key
        )
        self._sub = sub
        self._tag = tag
        self._epoch = epoch

    async def _ack(self) -> None:
        self._sub._settle(self, None, None)

    async def _nack(self, requeue: bool, delay: float | None) -> None:
        self._sub._settle(self, requeue, delay)


class _ZmqSubscription(Subscription):
    def __init__(self, broker: ZeroMQBroker, queue: str, sid: int, prefetch: int) -> None:
        self._broker = broker
        self.queue = queue
        self.sid = sid
        self.prefetch = prefetch
        self._buffer: deque[_ZmqDelivery] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._subscribed: asyncio.Future[Any] | None = None

    def _start(self) -> None:
        # t op, s subscription id, q queue, p prefetch (the device's credit for this consumer)
        self._subscribed = self._broker._request({"t": "sub", "s": self.sid, "q": self.queue, "p": self.prefetch})
        self._subscribed.add_done_callback(self._on_subscribed)

    def _on_subscribed(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None and not self._closed:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _deliver(self, deliveries: list[_ZmqDelivery]) -> None:
        self._buffer.extend(deliveries)
        self._wake()

    def _reset(self) -> None:
        self._buffer.clear()  # void: the device that sent them is gone or forgot us

    def _settle(self, delivery: _ZmqDelivery, requeue: bool | None, delay: float | None) -> None:
        if self._closed or delivery._epoch != self._broker._epoch:
            return  # the device already took it back (closed or reset)
        self._broker._settle(delivery._tag, requeue, delay)

    async def __anext__(self) -> Delivery:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            if self._buffer:
                return self._buffer.popleft()  # no await between taking it and returning it
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._wake()
        broker = self._broker
        broker._subs.pop(self.sid, None)
        if broker._sock is not None and not broker._closing:
            try:
                # t op, s subscription id
                await broker._wait(broker._request({"t": "unsub", "s": self.sid}), "unsubscribe")
            except BrokerError as exc:  # the device will requeue them when it drops this connection
                log.warning("zmq unsubscribe from %r failed: %s", self.queue, exc)

    def __repr__(self) -> str:
        return f"<ZeroMQ subscription queue={self.queue!r} prefetch={self.prefetch} buffered={len(self._buffer)}>"


class ZeroMQBroker(Broker):
    """A connection to a taskstream ZeroMQ queue device. See ``docs/brokers.md`` for the mapping.

    Example:
        >>> async def example():
        ...     async with ZeroMQBroker("tcp://127.0.0.1:5555") as broker:
        ...         await broker.declare("jobs")
        ...         await broker.publish("jobs", b"{}")

    Args:
        endpoint: the device's ZeroMQ endpoint (``tcp://HOST:PORT`` or ``ipc:///path``).
        config: connection tuning.
    """

    def __init__(self, endpoint: str, config: ZeroMQConfig | None = None) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.config = config or ZeroMQConfig()
        self.capabilities = Capabilities(
            name="zmq",
            max_message_bytes=self.config.max_message_bytes,
            durable=False,
            ordered=True,
            fanout=True,
            visibility_timeout=None,
            max_batch=1000,
            reports_in_flight=True,
            reports_consumers=True,
        )
        self._sock: zmq.Socket[bytes] | None = None
        self._pump: SocketPump | None = None
        self._closing = False
        self._rids = itertools.count(1)
        self._ids = itertools.count(1)
        self._id_prefix = new_id()[:20] + "-"
        self._sids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._cmds: list[tuple[dict[str, Any], list[bytes]]] = []
        self._acks: list[int] = []
        self._nacks: list[list[Any]] = []
        self._outq: deque[list[bytes]] = deque()
        self._flush_scheduled = False
        self._subs: dict[int, _ZmqSubscription] = {}
        self._declared: dict[str, list[str]] = {}
        self._epoch = 0
        self._last_heard = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ZeroMQBroker:
        """Build from ``zmq://HOST:PORT?heartbeat=1&liveness=5`` or ``zmq://ipc/PATH``; ``options`` override."""
        endpoint = endpoint_from_url(url)
        return cls(endpoint, config_from_url(url, **options))

    # -- connection ---------------------------------------------------------------------------------

    @property
    def device_alive(self) -> bool:
        """False when the device has been silent for ``heartbeat_interval * heartbeat_liveness`` seconds."""
        silent = time.monotonic() - self._last_heard
        return self._sock is not None and silent <= self.config.heartbeat_interval * self.config.heartbeat_liveness

    async def connect(self) -> None:
        """Connect to the device and say hello; fails with :class:`BrokerConnectionError` if it does not answer."""
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        # a plain socket on the shared context, read by a SocketPump (frames handled in the turn they arrive)
        sock: zmq.Socket[bytes] = zmq.Socket(zmq.asyncio.Context.instance(), zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, new_routing_id())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise BrokerConnectionError(f"cannot connect to the zmq device at {self.endpoint}: {exc}") from exc
        self._sock = sock
        self._closing = False
        self._last_heard = time.monotonic()
        self._pump = SocketPump(sock, self._on_frames, on_writable=self._write)
        self._pump.start()
        self._tasks = []
        try:
            await self._wait(self._hello(), "hello")
        except BaseException:
            await self._shutdown(BrokerConnectionError("connection failed"))
            raise
        self._tasks.append(asyncio.create_task(self._heartbeat(), name=f"zmq-heartbeat:{self.endpoint}"))

    def _hello(self) -> asyncio.Future[Any]:
        config = self.config
        # t op, hb heartbeat interval (s), lv liveness (missed heartbeats before the device requeues our messages)
        return self._request({"t": "hello", "hb": config.heartbeat_interval, "lv": config.heartbeat_liveness})

    async def close(self) -> None:
        """Close every subscription (the device requeues their unacked messages) and the connection."""
        if self._sock is None or self._closing:
            return
        self._closing = True
        for sub in list(self._subs.values()):
            sub._closed = True
            sub._buffer.clear()
            sub._wake()
        self._subs.clear()
        try:
            await asyncio.wait_for(self._request({"t": "bye"}), min(2.0, self.config.request_timeout))
        except (TimeoutError, BrokerError):
            log.warning("zmq device at %s did not answer bye; it will requeue on missed heartbeats", self.endpoint)
        await self._shutdown(BrokerConnectionError(f"zmq broker connection to {self.endpoint} is closed"))

    async def _shutdown(self, error: BrokerError) -> None:
        tasks = self._tasks
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        self._pending.clear()
        self._cmds.clear()
        self._acks.clear()
        self._nacks.clear()
        self._outq.clear()
        if self._pump is not None:
            self._pump.close()
        self._sock = self._pump = None

    # -- sending ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._sock is None or self._closing:
            raise BrokerConnectionError(
                f"zmq broker for {self.endpoint} is not connected (use 'async with' or connect())"
            )

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _command(self, header: dict[str, Any], payload: list[bytes] | None = None) -> None:
        self._cmds.append((header, payload or []))
        self._schedule_flush()

    def _request(self, header: dict[str, Any], payload: list[bytes] | None = None) -> asyncio.Future[Any]:
        assert self._loop is not None
        rid = next(self._rids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending[rid] = future
        header["r"] = rid  # r: request id, echoed in the device's reply
        self._command(header, payload)
        return future

    async def _wait(self, future: asyncio.Future[Any], what: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.config.request_timeout)
        except BaseException as exc:
            if not future.done() or isinstance(exc, asyncio.CancelledError):
                future.add_done_callback(_retrieve)  # nobody will read a late answer
            if not isinstance(exc, TimeoutError):
                raise
            raise BrokerConnectionError(
                f"the zmq device at {self.endpoint} did not answer {what} within {self.config.request_timeout} s "
                "(is 'taskstream zmq-device' running there?)"
            ) from None

    def _settle(self, tag: int, requeue: bool | None, delay: float | None) -> None:
        if self._sock is None or self._closing:
            return
        if requeue is None:
            self._acks.append(tag)
        else:
            self._nacks.append([tag, requeue, delay])
        self._schedule_flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        pump = self._pump
        if pump is None:
            return
        batch: list[list[bytes]] = []
        if self._acks or self._nacks:
            # settlements first: always safe, and the device then has the credit before anything else
            # t op "settle", a acked tags, n nacks as [tag, requeue, delay]
            batch.append([orjson.dumps({"t": "st", "a": self._acks, "n": self._nacks})])
            self._acks, self._nacks = [], []
        for header, payload in self._cmds:
            if payload:  # messages travel back to back in one frame
                batch.append([orjson.dumps(header), payload[0] if len(payload) == 1 else b"".join(payload)])
            else:
                batch.append([orjson.dumps(header)])
        self._cmds.clear()
        if self._outq:
            self._outq.extend(batch)
            return
        for i, frames in enumerate(batch):
            try:
                pump.send(frames)
            except zmq.Again:
                # at the high-water mark: keep order, wait for room (DEALER never drops)
                self._outq.extend(batch[i:])
                pump.want_write = True
                pump.poke()
                return

    def _write(self) -> None:
        """The socket has room again: send what waited, in order (the pump calls this)."""
        pump = self._pump
        assert pump is not None
        while self._outq:
            try:
                pump.send(self._outq[0])
            except zmq.Again:
                return
            self._outq.popleft()
        pump.want_write = False

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval
        warned = False
        while True:
            await asyncio.sleep(interval)
            self._command({"t": "hb"})
            if not self.device_alive and not warned:
                log.warning(
                    "zmq device at %s has been silent for %.1f s",
                    self.endpoint,
                    interval * self.config.heartbeat_liveness,
                )
            warned = not self.device_alive

    # -- receiving ----------------------------------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        self._last_heard = time.monotonic()
        try:
            header = orjson.loads(frames[0])
            op = header["t"]  # t: operation
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            log.warning("zmq broker: ignoring a malformed frame from the device")
            return
        if op == "d":  # deliveries
            self._on_deliveries(header, frames)
        elif op == "rep":
            for rid, value in header.get("ok", ()):
                future = self._pending.pop(rid, None)
                if future is not None and not future.done():
                    future.set_result(value)
            for rid, kind, text in header.get("err", ()):
                future = self._pending.pop(rid, None)
                if future is not None and not future.done():
                    future.set_exception(_device_error(kind, text))
        elif op == "reset":
            self._on_reset()

    def _on_deliveries(self, header: dict[str, Any], frames: list[bytes]) -> None:
        sub = self._subs.get(header["s"])  # s: subscription id
        if sub is None or sub._closed:
            return  # the device requeues them on unsubscribe / bye
        epoch = self._epoch
        tags: list[int] = header["g"]  # g: delivery tags
        attempts: list[int] = header["a"]  # a: attempt (delivery count) of each
        lengths: list[int] = header["l"]  # l: [meta_len, body_len] of each record
        blob = frames[1]
        loads = orjson.loads
        deliveries = []
        offset = 0
        for i, tag in enumerate(tags):
            meta_end = offset + lengths[2 * i]
            end = meta_end + lengths[2 * i + 1]
            deliveries.append(
                _ZmqDelivery(sub, tag, attempts[i], loads(blob[offset:meta_end]), blob[meta_end:end], epoch)
            )
            offset = end
        sub._deliver(deliveries)

    def _on_reset(self) -> None:
        log.warning("zmq device at %s does not know this connection (restarted?): replaying state", self.endpoint)
        self._epoch += 1
        self._acks.clear()
        self._nacks.clear()
        # the same requests as hello, declare and subscribe (keys as there), sent without waiting for replies
        self._command({"t": "hello", "hb": self.config.heartbeat_interval, "lv": self.config.heartbeat_liveness})
        for queue, topics in self._declared.items():
            self._command({"t": "decl", "q": queue, "topics": topics})
        for sub in self._subs.values():
            sub._reset()
            self._command({"t": "sub", "s": sub.sid, "q": sub.queue, "p": sub.prefetch})

    # -- the Broker protocol ------------------------------------------------------------------------

    async def declare(
        self,
        queue: str,
        *,
        dead_letter: str | None = None,
        fifo: bool = False,
        topics: Sequence[str] = (),
    ) -> None:
        self._check_open()
        request = self._request({"t": "decl", "q": queue, "topics": list(topics)})  # t op, q queue
        await self._wait(request, f"declare {queue!r}")
        known = self._declared.setdefault(queue, [])
        known.extend(t for t in topics if t not in known)

    def _check_size(self, body: bytes) -> None:
        if len(body) > self.config.max_message_bytes:
            raise MessageTooLarge(len(body), self.config.max_message_bytes, "zmq")

    def _meta(self, message_id: str | None, headers: Mapping[str, Any] | None, key: str | None) -> bytes:
        if not message_id:  # unique without a uuid4 per message: connection prefix + counter
            message_id = f"{self._id_prefix}{next(self._ids):x}"
        try:
            return orjson.dumps([message_id, headers if isinstance(headers, dict) else dict(headers or {}), key])
        except TypeError as exc:  # orjson.JSONEncodeError
            raise PublishError(f"message headers must have string keys and JSON values: {exc}") from exc

    async def _publish_frames(
        self, queue: str, payload: list[bytes], lengths: list[int], delays: list[float | None]
    ) -> None:
        self._check_open()
        # t op, q queue, l [meta_len, body_len] per record, d one delay (s) or None per record (only if any)
        header: dict[str, Any] = {"t": "pub", "q": queue, "l": lengths}
        if any(d is not None for d in delays):
            header["d"] = delays
        # consecutive publishes to one queue in one loop tick share a frame and a reply
        last = self._cmds[-1] if self._cmds else None
        future = self._request(header, payload)
        if last is not None and last[0].get("t") == "pub" and last[0]["q"] == queue and "r" in last[0]:
            merged_header, merged_payload = last
            self._cmds.pop()  # the one _request just appended
            rids = merged_header["r"]  # r: one request id, or a list of them once merged
            merged_header["r"] = [*(rids if isinstance(rids, list) else [rids]), header["r"]]
            if "d" in merged_header or "d" in header:
                before = merged_header.get("d") or [None] * (len(merged_header["l"]) // 2)
                merged_header["d"] = [*before, *delays]
            merged_header["l"].extend(lengths)
            merged_payload.extend(payload)
        try:
            await self._wait(future, f"publish to {queue!r}")
        except _TooLargeAtDevice as exc:
            raise MessageTooLarge(exc.size, exc.limit, "zmq device") from None

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        key: str | None = None,
        delay: float | None = None,
    ) -> None:
        self._check_size(body)
        meta = self._meta(message_id, headers, key)
        await self._publish_frames(queue, [meta, body], [len(meta), len(body)], [delay])

    async def publish_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        payload: list[bytes] = []
        lengths: list[int] = []
        delays: list[float | None] = []
        meta_of = self._meta
        for message in messages:
            body = message.body
            self._check_size(body)
            meta = meta_of(message.message_id, message.headers, message.key)
            payload.append(meta)
            payload.append(body)
            lengths.append(len(meta))
            lengths.append(len(body))
            delays.append(message.delay)
        await self._publish_frames(queue, payload, lengths, delays)

    async def publish_topic(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        self._check_open()
        self._check_size(body)
        meta = self._meta(message_id, {**(headers or {}), "topic": topic}, None)
        # t op, k topic, l [meta_len, body_len]
        request = self._request({"t": "topic", "k": topic, "l": [len(meta), len(body)]}, [meta, body])
        try:
            await self._wait(request, f"publish to {topic!r}")
        except _TooLargeAtDevice as exc:
            raise MessageTooLarge(exc.size, exc.limit, "zmq device") from None

    def consume(self, queue: str, *, prefetch: int = 64) -> Subscription:
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, got {prefetch}")
        self._check_open()
        sub = _ZmqSubscription(self, queue, next(self._sids), prefetch)
        self._subs[sub.sid] = sub
        sub._start()
        return sub

    async def _simple(self, op: str, queue: str) -> Any:
        self._check_open()
        return await self._wait(self._request({"t": op, "q": queue}), f"{op} {queue!r}")  # t op, q queue

    async def purge(self, queue: str) -> None:
        await self._simple("purge", queue)

    async def depth(self, queue: str) -> int:
        return int(await self._simple("depth", queue))

    async def delete_queue(self, queue: str) -> None:
        await self._simple("delq", queue)
        self._declared.pop(queue, None)

    async def device_stats(self) -> dict[str, Any]:
        """The device's counters and per-queue figures (ready, delayed, unacked, consumers)."""
        self._check_open()
        stats: dict[str, Any] = await self._wait(self._request({"t": "stats"}), "stats")
        return stats

    async def queue_stats(self, queue: str) -> QueueStats:
        """Ready + delayed, unacked and consumers of ``queue``, from the device's ``stats``."""
        figures = (await self.device_stats())["queues"].get(queue)
        if figures is None:
            raise QueueNotFound(f"zmq device has no queue {queue!r} (declare it first)")
        return QueueStats(figures["ready"] + figures["delayed"], figures["unacked"], figures["consumers"])

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "closed"
        return f"<ZeroMQBroker {self.endpoint} {state} subscriptions={len(self._subs)}>"

"""The ZeroMQ queue device and the topic forwarder: what ``zmq://`` brokers connect to.

ZeroMQ has no broker, so taskstream brings one, the ZeroMQ way: a small device process (or an object inside
any process) that holds named queues in memory and hands messages to consumers with acknowledgements.
**Durability: none — messages held by the device live in its memory and are lost if the device dies.**
Everything else is at-least-once: a message leaves its queue only when a consumer acks it.

Run it::

    taskstream zmq-device --bind tcp://127.0.0.1:5555
    taskstream zmq-device --bind tcp://127.0.0.1:5555 --bind ipc:///tmp/taskstream.sock \\
        --pubsub-frontend tcp://127.0.0.1:5556 --pubsub-backend tcp://127.0.0.1:5557

or in-process: ``async with ZmqDevice(["tcp://127.0.0.1:*"]) as device: ...`` (``device.endpoints`` holds the
bound addresses), or on its own thread from synchronous code: ``DeviceThread([...]).start()``.

Queue device
============

One ROUTER socket; every :class:`~taskstream.brokers.zeromq.ZeroMQBroker` connection is one DEALER with a
random routing id. Messages are multipart: frame 0 is a small orjson header ``{"t": op, ...}``; commands that
carry messages add one payload frame holding them back to back, each a *record* ``meta + body`` (``meta`` is
orjson ``[message_id, headers, key]``, never parsed by the device), with ``l: [meta_len, body_len, ...]`` in
the header. The device stores and forwards records without decoding them, and one frame carries many
messages (per-frame costs in ZeroMQ and pyzmq dominate small messages).

=========  ===================================================  =========================================
Op         Client -> device                                     Device does
=========  ===================================================  =========================================
hello      ``{r, hb, lv}``                                      registers the client and its heartbeat
decl       ``{r, q, topics}``                                   creates the queue, binds topic patterns
pub        ``{r: [rids], q, l, d: [delays]?}`` + records        queues them, then replies ok (the
                                                                producer's acknowledgement)
topic      ``{r, k, l}`` + one record                           copies it to every bound queue
sub        ``{r, s, q, p}``                                     consumer ``s`` with prefetch ``p``
unsub      ``{r, s}``                                           requeues the consumer's unacked messages
st         ``{a: [tags], n: [[tag, requeue, delay]]}``          acks and nacks, many per frame
depth      ``{r, q}`` (``purge``, ``delq`` alike)               replies the count
stats      ``{r}``                                              replies counters
hb         ``{}``                                               marks the client alive
bye        ``{r}``                                              requeues all its unacked, forgets it
=========  ===================================================  =========================================

Device -> client: ``rep {ok: [[rid, value]], err: [[rid, kind, text]]}`` (all replies of one cycle in one
frame), ``d {s, g: [tags], a: [attempts], l}`` + records (many deliveries per frame), ``hb``, ``reset``
(sent to a client the device does not know, e.g. after a device restart: the client replays its
declarations and subscriptions).

Delivery is by credit: a consumer holds at most ``prefetch`` unacked messages, and acks free credit. Unacked
messages go back to the front of their queue (attempt + 1 on the next delivery) when the consumer nacks,
unsubscribes, says bye, or is declared dead: its heartbeats stopped for ``hb * lv`` seconds, or the ROUTER
reports its connection gone (``ROUTER_MANDATORY``: sending to a vanished peer fails instead of dropping).
A nack with a delay parks the message on a timer. Dead-lettering with a reason is done by the consumer
runtime (:mod:`taskstream.consumer`), which publishes to ``<queue>.dlq`` before acking.

High-water marks, on purpose: DEALER sockets never drop (they wait when full); the device's ROUTER runs
with ``ROUTER_MANDATORY``, so a full peer gives ``EAGAIN`` and the device keeps the frames in a per-client
backlog rather than dropping them. Credit bounds how much can pile up.

Topic forwarder
===============

:class:`Forwarder` is an XSUB/XPUB proxy: publishers connect to the frontend, subscribers to the backend,
nothing binds twice. Topic filters are ZeroMQ prefix filters on the first frame. PUB/SUB is lossy by nature;
here losses are counted and visible: the backend XPUB runs with ``XPUB_NODROP``, so a message that a slow
subscriber cannot take is counted in ``Forwarder.stats.dropped`` instead of vanishing, and
:class:`~taskstream.brokers.zeromq.TopicSubscriber` finds gaps in each publisher's sequence numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any, Self, cast

import orjson
import typer
from pydantic import BaseModel, ConfigDict, Field

from taskstream.brokers.base import topic_matches
from taskstream.errors import BrokerConnectionError, ConfigurationError, MissingExtraError

try:
    import zmq
    import zmq.asyncio

    _HAVE_ZMQ = True
except ImportError:  # pragma: no cover - only without the 'zmq' extra
    _HAVE_ZMQ = False

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_LIVENESS",
    "DEFAULT_HWM",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PUBSUB_HWM",
    "DeviceConfig",
    "DeviceStats",
    "DeviceThread",
    "Forwarder",
    "ForwarderStats",
    "PROTOCOL_VERSION",
    "ZmqDevice",
    "check_endpoint",
    "endpoint_url",
    "new_routing_id",
    "recv_nowait",
    "register",
    "require_zmq",
    "run_device",
    "send_nowait",
    "split_records",
]

log = logging.getLogger("taskstream.zmq.device")

PROTOCOL_VERSION = 1
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_LIVENESS = 5
DEFAULT_HWM = 10_000
DEFAULT_PUBSUB_HWM = 100_000
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_DRAIN = 2000  # frames read without yielding before replies and deliveries go out
_TICK = 0.1  # seconds between heartbeat / liveness checks
_BATCH_BYTES = 1 << 20  # a delivery frame stops growing past this many bytes


def require_zmq() -> None:
    """Raise :class:`MissingExtraError` naming the ``pip install`` when pyzmq is missing."""
    if not _HAVE_ZMQ:
        raise MissingExtraError("zmq", "zmq", "pyzmq")


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if it is a ``tcp://`` or ``ipc://`` ZeroMQ address, else raise ConfigurationError."""
    if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://")) or len(endpoint) <= 6:
        raise ConfigurationError(f"bad ZeroMQ endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc:///path/to/socket")
    return endpoint


def send_nowait(sock: zmq.asyncio.Socket, frames: Sequence[bytes]) -> None:
    """Send ``frames`` now or raise ``zmq.Again``.

    Goes through the asyncio socket on purpose: a ZeroMQ socket's file descriptor is edge-triggered, and an
    operation on a raw (shadow) socket can consume the edge another task on this socket waits for, which then
    never wakes. pyzmq's asyncio socket rechecks its events after its own operations.
    """
    future = cast("asyncio.Future[Any]", sock.send_multipart(frames, flags=zmq.NOBLOCK))
    if not future.done():  # other sends are queued on this socket: do not jump the queue
        future.cancel()
        raise zmq.Again()
    future.result()


def recv_nowait(sock: zmq.asyncio.Socket) -> list[bytes]:
    """Receive one multipart message now or raise ``zmq.Again`` (see :func:`send_nowait` for why not raw)."""
    future = cast("asyncio.Future[list[bytes]]", sock.recv_multipart(flags=zmq.NOBLOCK))
    return future.result()


class DeviceConfig(BaseModel):
    """Tuning of a :class:`ZmqDevice`.

    Attributes:
        heartbeat_interval: seconds between the device's heartbeats to each client (and the interval assumed
            for a client that did not say).
        heartbeat_liveness: missed heartbeat intervals after which a silent client is declared dead and its
            unacked messages are requeued.
        hwm: high-water mark (messages) of the ROUTER socket, each way.
        max_message_bytes: largest body the device accepts.
        delivery_batch: most messages sent to one consumer in one multipart frame.
    """

    model_config = ConfigDict(frozen=True)

    heartbeat_interval: float = Field(DEFAULT_HEARTBEAT_INTERVAL, gt=0)
    heartbeat_liveness: int = Field(DEFAULT_HEARTBEAT_LIVENESS, ge=1)
    hwm: int = Field(DEFAULT_HWM, ge=0)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    delivery_batch: int = Field(512, ge=1)


class _CommandError(Exception):
    def __init__(self, kind: str, text: str) -> None:
        self.kind = kind
        self.text = text
        super().__init__(text)


@dataclass(slots=True, eq=False)
class _Msg:
    record: bytes  # meta + body, as they came
    meta_len: int
    deliveries: int = 0


def split_records(header: dict[str, Any], frames: list[bytes]) -> list[tuple[bytes, int]]:
    """The ``(record, meta_len)`` pairs packed in a frame set: ``header["l"]`` holds ``[meta_len, body_len]``
    per message, ``frames[-1]`` the records back to back.

    Raises:
        ValueError: the lengths do not add up to the blob.
    """
    lengths: list[int] = header["l"]
    blob = frames[-1] if len(frames) > 1 else b""
    if len(lengths) % 2 or sum(lengths) != len(blob):
        raise ValueError(f"record lengths {sum(lengths)} do not match the {len(blob)}-byte payload")
    if len(lengths) == 2:
        return [(blob, lengths[0])]
    records = []
    offset = 0
    for i in range(0, len(lengths), 2):
        end = offset + lengths[i] + lengths[i + 1]
        records.append((blob[offset:end], lengths[i]))
        offset = end
    return records


@dataclass(slots=True, eq=False)
class _Queue:
    name: str
    ready: deque[_Msg] = field(default_factory=deque)
    topics: list[str] = field(default_factory=list)
    subs: list[_Sub] = field(default_factory=list)
    delayed: dict[int, asyncio.TimerHandle] = field(default_factory=dict)
    rr: int = 0


@dataclass(slots=True, eq=False)
class _Sub:
    client: _Client
    sid: int
    queue: _Queue
    prefetch: int
    unacked: dict[int, _Msg] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Client:
    identity: bytes
    interval: float
    liveness: int
    last_seen: float
    last_sent: float = 0.0
    subs: dict[int, _Sub] = field(default_factory=dict)
    ok: list[list[Any]] = field(default_factory=list)
    err: list[list[Any]] = field(default_factory=list)
    backlog: deque[list[bytes]] = field(default_factory=deque)
    gone: bool = False


@dataclass(slots=True)
class DeviceStats:
    """Counters of a running :class:`ZmqDevice`."""

    published: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    nacked: int = 0
    clients_expired: int = 0
    clients_gone: int = 0
    bad_frames: int = 0
    backlogged: int = 0


class ZmqDevice:
    """The queue device. Async: ``await start()`` binds and serves on the running loop; ``await stop()``.

    Example:
        >>> async def example():
        ...     async with ZmqDevice(["tcp://127.0.0.1:*"]) as device:
        ...         print(device.endpoints)  # ['tcp://127.0.0.1:43127']

    Args:
        bind: endpoints to bind (``tcp://HOST:PORT``, ``tcp://HOST:*`` for a free port, ``ipc:///path``).
        config: tuning; defaults are fine.
    """

    def __init__(self, bind: Sequence[str] | str, config: DeviceConfig | None = None) -> None:
        require_zmq()
        binds = [bind] if isinstance(bind, str) else list(bind)
        if not binds:
            raise ConfigurationError("the zmq device needs at least one endpoint to bind")
        self.bind = [check_endpoint(b) for b in binds]
        self.config = config or DeviceConfig()
        self.endpoints: list[str] = []
        self.stats = DeviceStats()
        self._queues: dict[str, _Queue] = {}
        self._clients: dict[bytes, _Client] = {}
        self._inflight: dict[int, _Sub] = {}
        # random start: tags of a restarted device do not collide with tags clients still hold
        self._tags = itertools.count(random.getrandbits(40) + 1)
        self._delay_ids = itertools.count(1)
        self._dirty: set[_Queue] = set()
        self._touched: set[_Client] = set()
        self._flush_scheduled = False
        self._retry_handle: asyncio.TimerHandle | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: dict[str, Callable[[_Client, dict[str, Any], list[bytes]], Any]] = {
            "hello": self._op_hello,
            "decl": self._op_declare,
            "pub": self._op_publish,
            "topic": self._op_topic,
            "sub": self._op_subscribe,
            "unsub": self._op_unsubscribe,
            "st": self._op_settle,
            "depth": self._op_depth,
            "purge": self._op_purge,
            "delq": self._op_delete,
            "stats": self._op_stats,
            "hb": self._op_heartbeat,
            "bye": self._op_bye,
        }

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._sock is not None

    async def start(self) -> None:
        """Bind every endpoint and start serving on the running event loop."""
        if self._sock is not None:
            return
        self._loop = asyncio.get_running_loop()
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        try:
            for endpoint in self.bind:
                sock.bind(endpoint)
                self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError as exc:
            sock.close(0)
            ctx.term()
            self.endpoints.clear()
            raise BrokerConnectionError(f"the zmq device cannot bind {endpoint!r}: {exc}") from exc
        self._ctx, self._sock = ctx, sock
        self._tasks = [
            asyncio.create_task(self._serve(), name="zmq-device:serve"),
            asyncio.create_task(self._tick(), name="zmq-device:tick"),
        ]
        log.info("zmq device serving on %s", ", ".join(self.endpoints))

    async def stop(self) -> None:
        """Stop serving and close the socket. Messages still held are dropped (the device is not durable)."""
        if self._sock is None:
            return
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for q in self._queues.values():
            for handle in q.delayed.values():
                handle.cancel()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self._sock.close(0)
        assert self._ctx is not None
        self._ctx.term()
        self._sock = self._ctx = None
        self._queues.clear()
        self._clients.clear()
        self._inflight.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def snapshot(self) -> dict[str, Any]:
        """Counters, queues (ready, delayed, unacked, consumers) and clients, as plain data."""
        queues = {}
        for name, q in self._queues.items():
            queues[name] = {
                "ready": len(q.ready),
                "delayed": len(q.delayed),
                "unacked": sum(len(s.unacked) for s in q.subs),
                "consumers": len(q.subs),
                "topics": list(q.topics),
            }
        return {
            "endpoints": list(self.endpoints),
            "clients": len(self._clients),
            "in_flight": len(self._inflight),
            "queues": queues,
            **{name: getattr(self.stats, name) for name in DeviceStats.__dataclass_fields__},
        }

    # -- the loop -----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            try:
                self._handle(frames)
                for _ in range(_DRAIN):
                    try:
                        frames = recv_nowait(sock)
                    except zmq.Again:
                        break
                    self._handle(frames)
                self._flush()
            except Exception:  # a bug must not take the device down with every queue in it
                log.exception("zmq device: unexpected error while serving; carrying on")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            try:
                self._check_clients()
            except Exception:
                log.exception("zmq device: unexpected error in the heartbeat check; carrying on")

    def _check_clients(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if now - client.last_seen > client.interval * client.liveness:
                log.warning(
                    "zmq client %s missed %d heartbeats: requeueing its %d unacked messages",
                    client.identity.hex(),
                    client.liveness,
                    sum(len(s.unacked) for s in client.subs.values()),
                )
                self.stats.clients_expired += 1
                self._drop_client(client)
            elif now - client.last_sent >= client.interval:
                # also how a vanished peer is found: ROUTER_MANDATORY fails the send
                self._send(client, [b'{"t":"hb"}'])
        self._flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.stats.bad_frames += 1
            return
        identity = frames[0]
        try:
            header = orjson.loads(frames[1])
            op = header["t"]
            handler = self._ops[op]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.stats.bad_frames += 1
            log.warning("zmq device: bad frame from %s: %s", identity.hex(), exc)
            return
        now = time.monotonic()
        client = self._clients.get(identity)
        if client is None:
            client = _Client(identity, self.config.heartbeat_interval, self.config.heartbeat_liveness, now)
            if op == "bye":
                self._touched.add(client)
                self._reply(client, header, None)
                return
            self._clients[identity] = client
            if op != "hello":
                # the client knew a device that is gone (restart or expiry): ask it to replay its state
                self._send(client, [b'{"t":"reset"}'])
        client.last_seen = now
        try:
            value = handler(client, header, frames)
        except _CommandError as exc:
            self._error(client, header, exc.kind, exc.text)
            return
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self._error(client, header, "BadRequest", f"bad {op!r} request: {type(exc).__name__}: {exc}")
            return
        self._reply(client, header, value)

    def _reply(self, client: _Client, header: dict[str, Any], value: Any) -> None:
        rid = header.get("r")
        if rid is None:
            return
        if isinstance(rid, list):
            client.ok.extend([r, value] for r in rid)
        else:
            client.ok.append([rid, value])
        self._touched.add(client)

    def _error(self, client: _Client, header: dict[str, Any], kind: str, text: str) -> None:
        rid = header.get("r")
        if rid is None:
            log.warning("zmq device: %s: %s", kind, text)
            return
        for r in rid if isinstance(rid, list) else [rid]:
            client.err.append([r, kind, text])
        self._touched.add(client)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._sock is None:
            return
        while self._dirty:  # deliveries first: consumers waiting on them are the latency that matters
            dirty, self._dirty = self._dirty, set()
            for q in dirty:
                self._dispatch(q)
        touched, self._touched = self._touched, set()
        for client in touched:
            if client.ok or client.err:
                frame = orjson.dumps({"t": "rep", "ok": client.ok, "err": client.err})
                client.ok, client.err = [], []
                self._send(client, [frame])

    def _send(self, client: _Client, frames: list[bytes]) -> None:
        if client.gone:
            return
        client.last_sent = time.monotonic()
        if client.backlog:
            client.backlog.append(frames)
            return
        assert self._sock is not None
        try:
            send_nowait(self._sock, [client.identity, *frames])
        except zmq.Again:
            # the peer's pipe is at its high-water mark: keep the frames, never drop them
            client.backlog.append(frames)
            self.stats.backlogged += 1
            self._retry_later()
        except zmq.ZMQError as exc:
            self.stats.clients_gone += 1
            log.info("zmq client %s disconnected (%s): requeueing its unacked messages", client.identity.hex(), exc)
            self._drop_client(client)

    def _retry_later(self) -> None:
        if self._retry_handle is None and self._loop is not None:
            self._retry_handle = self._loop.call_later(0.005, self._retry_backlogs)

    def _retry_backlogs(self) -> None:
        self._retry_handle = None
        sock = self._sock
        if sock is None:
            return
        pending = False
        for client in list(self._clients.values()):
            while client.backlog and not client.gone:
                try:
                    send_nowait(sock, [client.identity, *client.backlog[0]])
                except zmq.Again:
                    pending = True
                    break
                except zmq.ZMQError:
                    self.stats.clients_gone += 1
                    self._drop_client(client)
                    break
                client.backlog.popleft()
        if pending:
            self._retry_later()
        self._schedule_flush()

    # -- queues -------------------------------------------------------------------------------------

    def _queue(self, name: Any) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            raise _CommandError("QueueNotFound", f"zmq device has no queue {name!r} (declare it first)")
        return q

    def _enqueue(self, q: _Queue, msg: _Msg, delay: float | None) -> None:
        if delay is not None and delay > 0:
            assert self._loop is not None
            key = next(self._delay_ids)
            q.delayed[key] = self._loop.call_later(delay, self._delay_due, q, key, msg)
            return
        q.ready.append(msg)
        if q.subs:
            self._dirty.add(q)

    def _delay_due(self, q: _Queue, key: int, msg: _Msg) -> None:
        if q.delayed.pop(key, None) is None:
            return
        q.ready.append(msg)
        if q.subs:
            self._dirty.add(q)
            self._schedule_flush()

    def _dispatch(self, q: _Queue) -> None:
        if self._queues.get(q.name) is not q:
            return
        batch = self.config.delivery_batch
        while q.ready and q.subs:
            progressed = False
            count = len(q.subs)
            for _ in range(count):
                if not q.ready or not q.subs:
                    break
                sub = q.subs[q.rr % len(q.subs)]
                q.rr += 1
                credit = sub.prefetch - len(sub.unacked)
                if credit <= 0 or sub.client.gone:
                    continue
                take = min(credit, len(q.ready), batch)
                tags: list[int] = []
                attempts: list[int] = []
                lengths: list[int] = []
                records: list[bytes] = []
                size = 0
                while take and size < _BATCH_BYTES:
                    take -= 1
                    msg = q.ready.popleft()
                    msg.deliveries += 1
                    if msg.deliveries > 1:
                        self.stats.redelivered += 1
                    tag = next(self._tags)
                    sub.unacked[tag] = msg
                    self._inflight[tag] = sub
                    tags.append(tag)
                    attempts.append(msg.deliveries)
                    record = msg.record
                    lengths.append(msg.meta_len)
                    lengths.append(len(record) - msg.meta_len)
                    records.append(record)
                    size += len(record)
                self.stats.delivered += len(tags)
                header = orjson.dumps({"t": "d", "s": sub.sid, "g": tags, "a": attempts, "l": lengths})
                self._send(sub.client, [header, records[0] if len(records) == 1 else b"".join(records)])
                progressed = True
            if not progressed:
                return

    def _unsubscribe(self, sub: _Sub) -> None:
        sub.client.subs.pop(sub.sid, None)
        q = sub.queue
        with contextlib.suppress(ValueError):
            q.subs.remove(sub)
        if sub.unacked:
            for tag in sub.unacked:
                self._inflight.pop(tag, None)
            # back to the front, in the order they were delivered
            q.ready.extendleft(reversed(list(sub.unacked.values())))
            sub.unacked.clear()
            if q.subs:
                self._dirty.add(q)
                self._schedule_flush()

    def _drop_client(self, client: _Client) -> None:
        client.gone = True
        client.backlog.clear()
        if self._clients.get(client.identity) is client:
            del self._clients[client.identity]
        for sub in list(client.subs.values()):
            self._unsubscribe(sub)

    # -- operations ---------------------------------------------------------------------------------

    def _op_hello(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        client.interval = max(0.01, float(header.get("hb", self.config.heartbeat_interval)))
        client.liveness = max(1, int(header.get("lv", self.config.heartbeat_liveness)))
        return {"v": PROTOCOL_VERSION, "max_message_bytes": self.config.max_message_bytes}

    def _op_heartbeat(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        return None

    def _op_bye(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        self._drop_client(client)
        client.gone = False  # still answer this request
        self._touched.add(client)
        return None

    def _op_declare(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        name = header["q"]
        if not isinstance(name, str) or not name or len(name) > 255:
            raise _CommandError("BadRequest", f"bad queue name {name!r}: 1 to 255 characters")
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name)
        for pattern in header.get("topics") or ():
            if not isinstance(pattern, str):
                raise _CommandError("BadRequest", f"bad topic pattern {pattern!r}")
            if pattern not in q.topics:
                q.topics.append(pattern)
        return None

    def _records(self, header: dict[str, Any], frames: list[bytes]) -> list[tuple[bytes, int]]:
        if len(frames) != 3:
            raise _CommandError("BadRequest", "a publish carries exactly one payload frame")
        limit = self.config.max_message_bytes
        for body_len in header["l"][1::2]:
            if body_len > limit:
                raise _CommandError("MessageTooLarge", orjson.dumps([body_len, limit]).decode())
        return split_records(header, frames)

    def _op_publish(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])
        records = self._records(header, frames)
        delays = header.get("d")
        if delays is not None and len(delays) != len(records):
            raise _CommandError("BadRequest", "one delay per message expected")
        for i, (record, meta_len) in enumerate(records):
            self._enqueue(q, _Msg(record, meta_len), delays[i] if delays is not None else None)
        self.stats.published += len(records)
        return None

    def _op_topic(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        topic = header["k"]
        records = self._records(header, frames)
        if len(records) != 1:
            raise _CommandError("BadRequest", "a topic publish carries one message")
        record, meta_len = records[0]
        matched = 0
        for q in self._queues.values():
            if any(topic_matches(pattern, topic) for pattern in q.topics):
                self._enqueue(q, _Msg(record, meta_len), None)
                matched += 1
        self.stats.published += matched
        return matched

    def _op_subscribe(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])
        sid = int(header["s"])
        prefetch = int(header["p"])
        if prefetch < 1:
            raise _CommandError("BadRequest", f"prefetch must be at least 1, got {prefetch}")
        sub = client.subs.get(sid)
        if sub is not None and sub.queue is not q:
            self._unsubscribe(sub)
            sub = None
        if sub is None:
            sub = client.subs[sid] = _Sub(client, sid, q, prefetch)
            q.subs.append(sub)
        sub.prefetch = prefetch
        self._dirty.add(q)
        return None

    def _op_unsubscribe(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        sub = client.subs.get(int(header["s"]))
        if sub is not None:
            self._unsubscribe(sub)
        return None

    def _op_settle(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        for tag in header.get("a") or ():
            msg, sub = self._release(client, tag)
            if msg is not None:
                self.stats.acked += 1
        for tag, requeue, delay in header.get("n") or ():
            msg, sub = self._release(client, tag)
            if msg is None or sub is None:
                continue
            self.stats.nacked += 1
            if requeue and self._queues.get(sub.queue.name) is sub.queue:
                self._enqueue(sub.queue, msg, delay)
        return None

    def _release(self, client: _Client, tag: int) -> tuple[_Msg | None, _Sub | None]:
        sub = self._inflight.get(tag)
        if sub is None or sub.client is not client:
            return None, None  # already requeued (closed, expired) or not this client's
        del self._inflight[tag]
        msg = sub.unacked.pop(tag)
        if sub.queue.ready:
            self._dirty.add(sub.queue)
        return msg, sub

    def _op_depth(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])
        return len(q.ready) + len(q.delayed)

    def _op_purge(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])
        count = len(q.ready)
        q.ready.clear()
        return count

    def _op_delete(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queues.pop(header["q"], None)
        if q is None:
            return False
        for handle in q.delayed.values():
            handle.cancel()
        q.delayed.clear()
        q.ready.clear()
        return True

    def _op_stats(self, client: _Client, header: dict[str, Any], frames: list[bytes]) -> Any:
        return self.snapshot()


# -- topic forwarder ----------------------------------------------------------------------------------


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
        require_zmq()
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
            for _ in range(_DRAIN):
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
            if message[:1] == b"\x01":
                subscriptions[message[1:]] = subscriptions.get(message[1:], 0) + 1
            elif message[:1] == b"\x00":
                left = subscriptions.get(message[1:], 0) - 1
                if left > 0:
                    subscriptions[message[1:]] = left
                else:
                    subscriptions.pop(message[1:], None)
            await xsub.send(message)


# -- running it -------------------------------------------------------------------------------------


class DeviceThread:
    """A :class:`ZmqDevice` (and optionally a :class:`Forwarder`) on its own event loop in a daemon thread.

    For synchronous code, tests and benchmarks that need a device that outlives one event loop.

    Example:
        >>> device = DeviceThread(["tcp://127.0.0.1:*"]).start()
        >>> url = device.url  # 'zmq://127.0.0.1:40123'
        >>> device.stop()
    """

    def __init__(
        self,
        bind: Sequence[str] | str = ("tcp://127.0.0.1:*",),
        *,
        pubsub: tuple[str, str] | None = None,
        config: DeviceConfig | None = None,
    ) -> None:
        require_zmq()
        self.device = ZmqDevice(bind, config) if bind else None
        self.forwarder = Forwarder(*pubsub) if pubsub else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The ``zmq://`` URL of the device's first endpoint."""
        assert self.device is not None and self.device.endpoints, "start() first"
        return endpoint_url(self.device.endpoints[0])

    def start(self, timeout: float = 10.0) -> Self:
        """Start the thread and wait until everything is bound; bind errors are raised here."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                if self.device is not None:
                    await self.device.start()
                if self.forwarder is not None:
                    await self.forwarder.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                if self.device is not None:
                    await self.device.stop()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                if self.forwarder is not None:
                    await self.forwarder.stop()
                if self.device is not None:
                    await self.device.stop()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="zmq-device", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise BrokerConnectionError(f"the zmq device thread did not start within {timeout} s")
        if failure:
            raise failure[0]
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the device's loop and return its result (e.g. ``lambda: device.snapshot()``)."""
        assert self._loop is not None, "start() first"

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the device (messages it holds are dropped) and join the thread."""
        if self._loop is None or self._stop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._loop = None


def endpoint_url(endpoint: str) -> str:
    """The ``zmq://`` broker URL for a device endpoint: ``tcp://h:p`` -> ``zmq://h:p``, ``ipc:///p`` ->
    ``zmq://ipc/p``."""
    if endpoint.startswith("tcp://"):
        return "zmq://" + endpoint[len("tcp://") :]
    if endpoint.startswith("ipc://"):
        return "zmq://ipc/" + endpoint[len("ipc://") :].lstrip("/")
    raise ConfigurationError(f"bad ZeroMQ endpoint {endpoint!r}")


async def run_device(
    bind: Sequence[str],
    *,
    pubsub: tuple[str, str] | None = None,
    config: DeviceConfig | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[ZmqDevice | None, Forwarder | None], None] | None = None,
) -> None:
    """Serve a device and/or a forwarder until ``stop`` is set, or SIGINT/SIGTERM when ``stop`` is None."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    device = ZmqDevice(bind, config) if bind else None
    forwarder = Forwarder(*pubsub) if pubsub else None
    try:
        if device is not None:
            await device.start()
        if forwarder is not None:
            await forwarder.start()
        if on_ready is not None:
            on_ready(device, forwarder)
        await stop.wait()
    finally:
        if forwarder is not None:
            await forwarder.stop()
        if device is not None:
            await device.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def register(cli: typer.Typer) -> None:
    """Add the ``zmq-device`` verb to the ``taskstream`` command line."""

    @cli.command("zmq-device")
    def zmq_device(
        bind: Annotated[
            list[str] | None,
            typer.Option(help="Endpoint for brokers (repeatable): tcp://HOST:PORT, tcp://HOST:* or ipc:///path."),
        ] = None,
        pubsub_frontend: Annotated[
            str | None, typer.Option(help="Forwarder endpoint publishers connect to (XSUB).")
        ] = None,
        pubsub_backend: Annotated[
            str | None, typer.Option(help="Forwarder endpoint subscribers connect to (XPUB).")
        ] = None,
        heartbeat: Annotated[
            float, typer.Option(help="Heartbeat interval (s) for clients that announce none; brokers announce theirs.")
        ] = DEFAULT_HEARTBEAT_INTERVAL,
        liveness: Annotated[
            int, typer.Option(help="Default missed heartbeats before a silent client's unacked messages are requeued.")
        ] = DEFAULT_HEARTBEAT_LIVENESS,
        max_message_bytes: Annotated[int, typer.Option(help="Largest message body accepted.")] = (
            DEFAULT_MAX_MESSAGE_BYTES
        ),
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Run the ZeroMQ queue device (and the topic forwarder) until SIGINT or SIGTERM.

        Queues live in this process's memory: messages it holds are lost if it dies (not durable).
        """
        require_zmq()
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if (pubsub_frontend is None) != (pubsub_backend is None):
            raise ConfigurationError("--pubsub-frontend and --pubsub-backend go together")
        pubsub = (pubsub_frontend, pubsub_backend) if pubsub_frontend and pubsub_backend else None
        if not bind and pubsub is None:
            raise ConfigurationError("nothing to run: give --bind and/or --pubsub-frontend/--pubsub-backend")
        try:
            config = DeviceConfig(
                heartbeat_interval=heartbeat, heartbeat_liveness=liveness, max_message_bytes=max_message_bytes
            )
        except ValueError as exc:
            raise ConfigurationError(f"bad zmq-device option: {exc}") from exc

        def ready(device: ZmqDevice | None, forwarder: Forwarder | None) -> None:
            if device is not None:
                for endpoint in device.endpoints:
                    typer.echo(f"queue device: {endpoint}  (brokers use {endpoint_url(endpoint)})")
            if forwarder is not None:
                typer.echo(f"forwarder: publishers -> {forwarder.frontend_endpoint}")
                typer.echo(f"forwarder: subscribers -> {forwarder.backend_endpoint}")
            typer.echo("not durable: messages held here are lost if this process dies", err=True)

        asyncio.run(run_device(bind or [], pubsub=pubsub, config=config, on_ready=ready))


def new_routing_id() -> bytes:
    """A fresh DEALER routing id (ZeroMQ reserves ids that start with a zero byte)."""
    return b"ts" + uuid.uuid4().bytes

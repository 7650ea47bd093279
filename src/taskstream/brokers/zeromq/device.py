"""The queue device: named queues in memory, handed to consumers with acknowledgements and credit.

ZeroMQ has no broker, so taskstream brings one: ``taskstream zmq-device --bind tcp://127.0.0.1:5555``, or in
process ``async with ZmqDevice(["tcp://127.0.0.1:*"]) as device: ...``. Not durable: messages it holds live in
its memory. The wire is described in :mod:`taskstream.brokers.zeromq.protocol`, the guarantees in
``docs/brokers.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import orjson
import zmq

from taskstream.brokers.base import topic_matches
from taskstream.brokers.zeromq.config import DeviceConfig, check_endpoint
from taskstream.brokers.zeromq.protocol import PROTOCOL_VERSION, split_records
from taskstream.brokers.zeromq.pump import SocketPump
from taskstream.brokers.zeromq.state import (
    CommandError,
    DeviceClient,
    DeviceQueue,
    DeviceStats,
    DeviceSub,
    StoredMessage,
)
from taskstream.errors import BrokerConnectionError, ConfigurationError

__all__ = ["ZmqDevice"]

log = logging.getLogger("taskstream.zmq.device")

_TICK = 0.1  # seconds between heartbeat / liveness checks
_BATCH_BYTES = 1 << 20  # a delivery frame stops growing past this many bytes


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
        binds = [bind] if isinstance(bind, str) else list(bind)
        if not binds:
            raise ConfigurationError("the zmq device needs at least one endpoint to bind")
        self.bind = [check_endpoint(b) for b in binds]
        self.config = config or DeviceConfig()
        self.endpoints: list[str] = []
        self.stats = DeviceStats()
        self._queues: dict[str, DeviceQueue] = {}
        self._clients: dict[bytes, DeviceClient] = {}
        self._inflight: dict[int, DeviceSub] = {}
        # random start: tags of a restarted device do not collide with tags clients still hold
        self._tags = itertools.count(random.getrandbits(40) + 1)
        self._delay_ids = itertools.count(1)
        self._dirty: set[DeviceQueue] = set()
        self._touched: set[DeviceClient] = set()
        self._flush_scheduled = False
        self._retry_handle: asyncio.TimerHandle | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._pump: SocketPump | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: dict[str, Callable[[DeviceClient, dict[str, Any], list[bytes]], Any]] = {
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
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
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
        # frames are handled in the loop turn that reads them; replies and deliveries go out after each batch
        self._pump = SocketPump(sock, self._handle, after_read=self._flush)
        self._pump.start()
        self._tasks = [asyncio.create_task(self._tick(), name="zmq-device:tick")]
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
        assert self._pump is not None and self._ctx is not None
        self._pump.close()
        self._ctx.term()
        self._sock = self._ctx = self._pump = None
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
            op = header["t"]  # t: operation
            handler = self._ops[op]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.stats.bad_frames += 1
            log.warning("zmq device: bad frame from %s: %s", identity.hex(), exc)
            return
        now = time.monotonic()
        client = self._clients.get(identity)
        if client is None:
            client = DeviceClient(identity, self.config.heartbeat_interval, self.config.heartbeat_liveness, now)
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
        except CommandError as exc:
            self._error(client, header, exc.kind, exc.text)
            return
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self._error(client, header, "BadRequest", f"bad {op!r} request: {type(exc).__name__}: {exc}")
            return
        self._reply(client, header, value)

    def _reply(self, client: DeviceClient, header: dict[str, Any], value: Any) -> None:
        rid = header.get("r")  # r: request id, or a list of them for merged publishes
        if rid is None:
            return
        if isinstance(rid, list):
            client.ok.extend([r, value] for r in rid)
        else:
            client.ok.append([rid, value])
        self._touched.add(client)

    def _error(self, client: DeviceClient, header: dict[str, Any], kind: str, text: str) -> None:
        rid = header.get("r")  # r: request id(s)
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
                frame = orjson.dumps({"t": "rep", "ok": client.ok, "err": client.err})  # t: operation
                client.ok, client.err = [], []
                self._send(client, [frame])

    def _send(self, client: DeviceClient, frames: list[bytes]) -> None:
        if client.gone:
            return
        client.last_sent = time.monotonic()
        if client.backlog:
            client.backlog.append(frames)
            return
        assert self._pump is not None
        try:
            self._pump.send([client.identity, *frames])
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
        pump = self._pump
        if pump is None:
            return
        pending = False
        for client in list(self._clients.values()):
            while client.backlog and not client.gone:
                try:
                    pump.send([client.identity, *client.backlog[0]])
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

    def _queue(self, name: Any) -> DeviceQueue:
        q = self._queues.get(name)
        if q is None:
            raise CommandError("QueueNotFound", f"zmq device has no queue {name!r} (declare it first)")
        return q

    def _enqueue(self, q: DeviceQueue, msg: StoredMessage, delay: float | None) -> None:
        if delay is not None and delay > 0:
            assert self._loop is not None
            key = next(self._delay_ids)
            q.delayed[key] = self._loop.call_later(delay, self._delay_due, q, key, msg)
            return
        q.ready.append(msg)
        if q.subs:
            self._dirty.add(q)

    def _delay_due(self, q: DeviceQueue, key: int, msg: StoredMessage) -> None:
        if q.delayed.pop(key, None) is None:
            return
        q.ready.append(msg)
        if q.subs:
            self._dirty.add(q)
            self._schedule_flush()

    def _dispatch(self, q: DeviceQueue) -> None:
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
                # deliveries: t op, s subscription id, g tags, a attempts, l record lengths
                header = orjson.dumps({"t": "d", "s": sub.sid, "g": tags, "a": attempts, "l": lengths})
                self._send(sub.client, [header, records[0] if len(records) == 1 else b"".join(records)])
                progressed = True
            if not progressed:
                return

    def _unsubscribe(self, sub: DeviceSub) -> None:
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

    def _drop_client(self, client: DeviceClient) -> None:
        client.gone = True
        client.backlog.clear()
        if self._clients.get(client.identity) is client:
            del self._clients[client.identity]
        for sub in list(client.subs.values()):
            self._unsubscribe(sub)

    # -- operations ---------------------------------------------------------------------------------

    def _op_hello(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        # hb: the client's heartbeat interval (s), lv: its liveness (missed beats); v: protocol version
        client.interval = max(0.01, float(header.get("hb", self.config.heartbeat_interval)))
        client.liveness = max(1, int(header.get("lv", self.config.heartbeat_liveness)))
        return {"v": PROTOCOL_VERSION, "max_message_bytes": self.config.max_message_bytes}

    def _op_heartbeat(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        return None

    def _op_bye(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        self._drop_client(client)
        client.gone = False  # still answer this request
        self._touched.add(client)
        return None

    def _op_declare(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        name = header["q"]  # q: queue name
        if not isinstance(name, str) or not name or len(name) > 255:
            raise CommandError("BadRequest", f"bad queue name {name!r}: 1 to 255 characters")
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = DeviceQueue(name)
        for pattern in header.get("topics") or ():
            if not isinstance(pattern, str):
                raise CommandError("BadRequest", f"bad topic pattern {pattern!r}")
            if pattern not in q.topics:
                q.topics.append(pattern)
        return None

    def _records(self, header: dict[str, Any], frames: list[bytes]) -> list[tuple[bytes, int]]:
        if len(frames) != 3:
            raise CommandError("BadRequest", "a publish carries exactly one payload frame")
        limit = self.config.max_message_bytes
        for body_len in header["l"][1::2]:  # l: [meta_len, body_len, ...]
            if body_len > limit:
                raise CommandError("MessageTooLarge", orjson.dumps([body_len, limit]).decode())
        return split_records(header, frames)

    def _op_publish(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])  # q: queue name
        records = self._records(header, frames)
        delays = header.get("d")  # d: one delay (s) or None per record
        if delays is not None and len(delays) != len(records):
            raise CommandError("BadRequest", "one delay per message expected")
        for i, (record, meta_len) in enumerate(records):
            self._enqueue(q, StoredMessage(record, meta_len), delays[i] if delays is not None else None)
        self.stats.published += len(records)
        return None

    def _op_topic(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        topic = header["k"]  # k: topic
        records = self._records(header, frames)
        if len(records) != 1:
            raise CommandError("BadRequest", "a topic publish carries one message")
        record, meta_len = records[0]
        matched = 0
        for q in self._queues.values():
            if any(topic_matches(pattern, topic) for pattern in q.topics):
                self._enqueue(q, StoredMessage(record, meta_len), None)
                matched += 1
        self.stats.published += matched
        return matched

    def _op_subscribe(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])  # q: queue name
        sid = int(header["s"])  # s: subscription id
        prefetch = int(header["p"])  # p: prefetch (credit)
        if prefetch < 1:
            raise CommandError("BadRequest", f"prefetch must be at least 1, got {prefetch}")
        sub = client.subs.get(sid)
        if sub is not None and sub.queue is not q:
            self._unsubscribe(sub)
            sub = None
        if sub is None:
            sub = client.subs[sid] = DeviceSub(client, sid, q, prefetch)
            q.subs.append(sub)
        sub.prefetch = prefetch
        self._dirty.add(q)
        return None

    def _op_unsubscribe(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        sub = client.subs.get(int(header["s"]))  # s: subscription id
        if sub is not None:
            self._unsubscribe(sub)
        return None

    def _op_settle(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        for tag in header.get("a") or ():  # a: acked tags
            msg, sub = self._release(client, tag)
            if msg is not None:
                self.stats.acked += 1
        for tag, requeue, delay in header.get("n") or ():  # n: nacks
            msg, sub = self._release(client, tag)
            if msg is None or sub is None:
                continue
            self.stats.nacked += 1
            if requeue and self._queues.get(sub.queue.name) is sub.queue:
                self._enqueue(sub.queue, msg, delay)
        return None

    def _release(self, client: DeviceClient, tag: int) -> tuple[StoredMessage | None, DeviceSub | None]:
        sub = self._inflight.get(tag)
        if sub is None or sub.client is not client:
            return None, None  # already requeued (closed, expired) or not this client's
        del self._inflight[tag]
        msg = sub.unacked.pop(tag)
        if sub.queue.ready:
            self._dirty.add(sub.queue)
        return msg, sub

    def _op_depth(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])  # q: queue name
        return len(q.ready) + len(q.delayed)

    def _op_purge(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queue(header["q"])  # q: queue name
        count = len(q.ready)
        q.ready.clear()
        return count

    def _op_delete(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        q = self._queues.pop(header["q"], None)  # q: queue name
        if q is None:
            return False
        for handle in q.delayed.values():
            handle.cancel()
        q.delayed.clear()
        q.ready.clear()
        return True

    def _op_stats(self, client: DeviceClient, header: dict[str, Any], frames: list[bytes]) -> Any:
        return self.snapshot()

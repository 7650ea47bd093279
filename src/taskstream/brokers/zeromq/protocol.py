"""The wire between :class:`ZeroMQBroker` connections and the queue device, and the socket helpers both use.

One ROUTER socket on the device; every broker connection is one DEALER with a random routing id. Frame 0 of
every message is a small orjson header ``{"t": op, ...}``; commands that carry messages add one payload frame
holding them back to back, each a *record* ``meta + body`` (``meta`` is orjson ``[message_id, headers, key]``,
never parsed by the device), with ``"l": [meta_len, body_len, ...]`` in the header.

The header keys are one letter to keep small frames small; every use names them in a comment:

====  ======================================================  ====  ============================================
Key   Meaning                                                 Key   Meaning
====  ======================================================  ====  ============================================
t     operation (``hello pub sub st d rep``, ...)             a     acked tags (``st``); attempts (``d``)
r     request id, or a list of them (merged publishes)        n     nacks ``[[tag, requeue, delay]]`` (``st``)
q     queue name                                              g     delivery tags (``d``)
s     subscription id                                         k     topic (``topic``)
p     prefetch (credit)                                       hb    heartbeat interval, seconds (``hello``)
l     record lengths ``[meta_len, body_len, ...]``            lv    heartbeat liveness (``hello``)
d     delays in seconds, one per record (``pub``)             v     protocol version (``hello`` reply)
====  ======================================================  ====  ============================================

Client -> device: ``hello {r, hb, lv}``, ``decl {r, q, topics}``, ``pub {r, q, l, d?}`` + records,
``topic {r, k, l}`` + one record, ``sub {r, s, q, p}``, ``unsub {r, s}``, ``st {a, n}``, ``depth {r, q}``
(``purge`` and ``delq`` alike), ``stats {r}``, ``hb {}``, ``bye {r}``. Device -> client:
``rep {ok: [[rid, value]], err: [[rid, kind, text]]}`` (all replies of one cycle in one frame),
``d {s, g, a, l}`` + records (many deliveries per frame), ``hb``, and ``reset`` (to a client the device does not
know, e.g. after a device restart: it replays its declarations and subscriptions).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any, cast

import zmq
import zmq.asyncio

__all__ = [
    "DRAIN",
    "PROTOCOL_VERSION",
    "new_routing_id",
    "recv_nowait",
    "send_nowait",
    "split_records",
]

PROTOCOL_VERSION = 1
DRAIN = 2000  # frames read without yielding to the loop before replies and deliveries go out


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


def new_routing_id() -> bytes:
    """A fresh DEALER routing id (ZeroMQ reserves ids that start with a zero byte)."""
    return b"ts" + uuid.uuid4().bytes


def split_records(header: dict[str, Any], frames: list[bytes]) -> list[tuple[bytes, int]]:
    """The ``(record, meta_len)`` pairs packed in a frame set.

    ``header["l"]`` (record lengths) holds ``[meta_len, body_len]`` per message, ``frames[-1]`` the records
    back to back.

    Raises:
        ValueError: the lengths do not add up to the blob.
    """
    lengths: list[int] = header["l"]  # l: record lengths
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

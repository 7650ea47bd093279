"""What the queue device holds: stored messages, queues, consumers, clients and counters."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CommandError", "DeviceClient", "DeviceQueue", "DeviceStats", "DeviceSub", "StoredMessage"]


class CommandError(Exception):
    """A request the device refuses; ``kind`` travels back to the client (``QueueNotFound``, ``BadRequest``...)."""

    def __init__(self, kind: str, text: str) -> None:
        self.kind = kind
        self.text = text
        super().__init__(text)


@dataclass(slots=True, eq=False)
class StoredMessage:
    """One message in a queue, stored as it came (never decoded) with its delivery count."""

    record: bytes  # meta + body, as they came
    meta_len: int
    deliveries: int = 0


@dataclass(slots=True, eq=False)
class DeviceQueue:
    """A named queue: ready messages, delayed ones on timers, bound topic patterns and its consumers."""

    name: str
    ready: deque[StoredMessage] = field(default_factory=deque)
    topics: list[str] = field(default_factory=list)
    subs: list[DeviceSub] = field(default_factory=list)
    delayed: dict[int, asyncio.TimerHandle] = field(default_factory=dict)
    rr: int = 0  # round-robin position among subs


@dataclass(slots=True, eq=False)
class DeviceSub:
    """One consumer of a queue on a client connection: its credit (``prefetch``) and unacked messages by tag."""

    client: DeviceClient
    sid: int
    queue: DeviceQueue
    prefetch: int
    unacked: dict[int, StoredMessage] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class DeviceClient:
    """One broker connection (a DEALER routing id): heartbeat settings, subscriptions, replies due, backlog."""

    identity: bytes
    interval: float
    liveness: int
    last_seen: float
    last_sent: float = 0.0
    subs: dict[int, DeviceSub] = field(default_factory=dict)
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

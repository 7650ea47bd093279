"""SocketPump: a ZeroMQ socket read from the loop's reader callback must never stall on its edge-triggered
descriptor: sends interleaved with arriving messages, bursts longer than one drain, a full pipe that drains."""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from taskstream.brokers.zeromq.protocol import DRAIN
from taskstream.brokers.zeromq.pump import SocketPump
from tests.support.waiting import wait_for


def _pair(hwm: int) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """Two connected DEALERs with high-water mark ``hwm`` (0: none) both ways."""
    ctx = zmq.asyncio.Context.instance()
    ours: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.DEALER)
    peer: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.DEALER)
    for sock in (ours, peer):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    ours.connect(f"tcp://127.0.0.1:{port}")
    return ours, peer


def _drain(sock: zmq.Socket[bytes], into: list[list[bytes]]) -> int:
    while True:
        try:
            into.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return len(into)


async def test_pump_reads_a_backlog_longer_than_one_drain() -> None:
    ours, peer = _pair(0)  # no high-water marks: every send below goes through at once
    got: list[int] = []
    batches = [0]
    pump = SocketPump(ours, lambda frames: got.append(int(frames[0])))
    pump.after_read = lambda: batches.__setitem__(0, batches[0] + 1)
    count = 3 * DRAIN + 17
    try:
        for i in range(count):
            peer.send(str(i).encode())
        await asyncio.sleep(0.5)  # most of it arrives before the pump starts: one signal for all of it
        pump.start()
        await wait_for(lambda: len(got) == count, what=f"{count} messages read (got {len(got)})", timeout=60)
        assert got == list(range(count))
        assert batches[0] >= 3  # handed over a drain at a time, the loop turning between them
    finally:
        pump.close()
        peer.close(0)


async def test_pump_reads_what_arrived_while_a_send_took_the_signal() -> None:
    ours, peer = _pair(0)
    got: list[bytes] = []
    pump = SocketPump(ours, lambda frames: got.append(frames[0]))
    pump.start()
    echoed: list[list[bytes]] = []
    try:
        for i in range(20):
            peer.send(b"%d" % i)
            time.sleep(0.02)  # noqa: ASYNC251 - blocks the loop on purpose: the message arrives, its signal waits
            pump.send([b"out"])  # ZeroMQ takes the signal here; the pump must look again by itself
            await wait_for(lambda i=i: got[-1:] == [b"%d" % i], what=f"message {i}", timeout=60)
        await wait_for(lambda: _drain(peer, echoed) == 20, what="every message the pump sent", timeout=60)
    finally:
        pump.close()
        peer.close(0)


async def test_pump_calls_on_writable_when_a_full_pipe_drains() -> None:
    ours, peer = _pair(10)
    waiting: list[bytes] = []
    sent: list[bytes] = []

    def write() -> None:
        while waiting:
            try:
                pump.send([waiting[0]])
            except zmq.Again:
                return
            sent.append(waiting.pop(0))
        pump.want_write = False

    pump = SocketPump(ours, lambda frames: None, on_writable=write)
    pump.start()
    received: list[list[bytes]] = []
    try:
        await wait_for(lambda: ours.get(zmq.EVENTS) & zmq.POLLOUT, what="the connection", timeout=60)
        body = b"x" * 100_000
        for _ in range(10_000):  # fill the pipes (socket buffers and both high-water marks)
            try:
                pump.send([body])
            except zmq.Again:
                break
        else:
            raise AssertionError("the pipe never filled")
        waiting.extend(str(i).encode() for i in range(5))
        pump.want_write = True
        pump.poke()
        small = [str(i).encode() for i in range(5)]

        def all_small_received() -> bool:
            _drain(peer, received)
            return [f[0] for f in received if f[0] != body] == small

        await wait_for(all_small_received, what="the waiting messages, sent once the pipe drained", timeout=60)
        assert not waiting and not pump.want_write
        assert sent == small
    finally:
        pump.close()
        peer.close(0)

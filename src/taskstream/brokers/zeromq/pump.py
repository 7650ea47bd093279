"""A ZeroMQ socket driven straight from the event loop: frames are handled in the loop turn that reads them.

pyzmq's asyncio socket resolves one future per receive, and the task awaiting it runs a loop turn later, after
pyzmq has read the socket's events three or four times: about 50 us per hop on a 2-core machine, four hops in a
task's round trip through the device. The pump registers the socket's file descriptor with the loop itself and
calls the owner's handler from the reader callback, for every frame set waiting.

A ZeroMQ file descriptor is edge-triggered: it says the socket's events *may* have changed, and any operation on
the socket, a send too, can take that signal without anyone reading what it announced. So the pump reads until
``EVENTS`` shows no input, and checks ``EVENTS`` again after every send made outside its own callback; a callback
that stopped at ``DRAIN`` frame sets (so replies and deliveries go out) runs again on the next loop turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import cast

import zmq

from taskstream.brokers.zeromq.protocol import DRAIN

__all__ = ["SocketPump"]

log = logging.getLogger("taskstream.zmq")


class SocketPump:
    """Reads a plain (non-asyncio) ZeroMQ socket from the event loop's reader callback.

    Args:
        sock: the socket; the pump closes it.
        on_frames: called with each multipart message, in order (an exception is logged, reading goes on).
        after_read: called after each batch of reads (the device flushes its replies and deliveries there).
        on_writable: called while :attr:`want_write` is set and the socket can take a message.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frames: Callable[[list[bytes]], None],
        *,
        after_read: Callable[[], None] | None = None,
        on_writable: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.on_frames = on_frames
        self.after_read = after_read
        self.on_writable = on_writable
        self.want_write = False
        self._fd: int = sock.FD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._reading = False

    def start(self) -> None:
        """Watch the socket on the running loop (and read what arrived before)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._ready)
        self.poke()

    def close(self) -> None:
        """Stop watching and close the socket at once (``linger`` 0)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None
        self.sock.close(0)

    def send(self, frames: Sequence[bytes]) -> None:
        """Send now or raise ``zmq.Again`` (the peer's pipe is full); ``zmq.ZMQError`` as the socket raises it."""
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        if not self._reading:
            self._recheck()

    def poke(self) -> None:
        """Check the socket on the next loop turn (after :attr:`want_write` was set, for one)."""
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._ready)

    def _recheck(self) -> None:
        """A send may have taken the descriptor's signal: look at the events it announced."""
        if self._scheduled or self.sock.closed:
            return
        events = _events(self.sock)
        if events & zmq.POLLIN or (self.want_write and events & zmq.POLLOUT):
            self.poke()

    def _ready(self) -> None:
        self._scheduled = False
        sock = self.sock
        if sock.closed:
            return
        self._reading = True
        try:
            for _ in range(DRAIN):
                events = _events(sock)
                if self.want_write and events & zmq.POLLOUT and self.on_writable is not None:
                    self.on_writable()
                if not events & zmq.POLLIN:
                    break
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.on_frames(frames)
                except Exception:  # a bug must not stop the reading: the signal is gone, nobody would call again
                    log.exception("zmq: unexpected error while handling a message; carrying on")
            else:
                self.poke()  # more waiting: let the replies and deliveries of these go out first
            if self.after_read is not None:
                try:
                    self.after_read()
                except Exception:
                    log.exception("zmq: unexpected error after reading; carrying on")
        finally:
            self._reading = False
        self._recheck()  # once for every send made above


def _events(sock: zmq.Socket[bytes]) -> int:
    """The socket's ``EVENTS`` (``POLLIN`` / ``POLLOUT`` bits); reading them also runs its pending commands."""
    return cast(int, sock.get(zmq.EVENTS))

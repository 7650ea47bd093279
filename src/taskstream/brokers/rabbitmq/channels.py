"""The driver boundary: AMQP errors mapped to taskstream errors, and the guard on waits for a channel."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiormq
import aiormq.exceptions as amqp_errors

from taskstream.errors import BrokerConnectionError, BrokerError, PublishError, QueueNotFound

__all__ = ["RETRYABLE", "ChannelGuard", "closed_without_reason", "lost_with_channel", "map_error", "refused_size_limit"]

# Errors after which a publish is sent again once the connection is back (until its deadline).
RETRYABLE = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    RuntimeError,
)


def lost_with_channel(exc: BaseException, channel: aiormq.abc.AbstractChannel | None) -> bool:
    """``exc`` says only that ``channel`` went away with its connection: aiormq fails the calls and confirms of a
    channel that closed without a reason with a bare ``Exception`` (or ``ChannelClosed(None, None)``)."""
    bare = not isinstance(exc, amqp_errors.AMQPError) and (channel is None or channel.is_closed)
    return bare or closed_without_reason(exc)


def closed_without_reason(exc: BaseException) -> bool:
    """A channel that closed with no reply code (aiormq's ``ChannelClosed(None, None)``): lost with its
    connection, not a refusal by the server (those carry a code and a subclass: not found, access refused)."""
    return type(exc) is amqp_errors.ChannelClosed and (not exc.args or exc.args[0] is None)


_SIZE_REFUSED = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def map_error(exc: BaseException, what: str) -> BrokerError:
    """One AMQP/driver error as a taskstream error (the caller chains it with ``from exc``)."""
    text = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, amqp_errors.ChannelNotFoundEntity):
        return QueueNotFound(text)
    if isinstance(exc, amqp_errors.DeliveryError):
        return PublishError(text)
    if isinstance(
        exc,
        amqp_errors.AMQPConnectionError
        | amqp_errors.ChannelInvalidStateError
        | ConnectionError
        | OSError
        | asyncio.TimeoutError,
    ):
        return BrokerConnectionError(text)
    return BrokerError(text)


def refused_size_limit(exc: BaseException, size: int) -> int | None:
    """The server's ``max_message_size`` if ``exc`` is its refusal of a message of ``size`` bytes, else ``None``.

    AMQP does not tell a client the server's limit; its refusal ("message size N is larger than configured max
    size M") is the only place it appears.
    """
    refused = _SIZE_REFUSED.search(str(exc))
    if refused and int(refused.group(1)) == size:
        return int(refused.group(2))
    return None


class ChannelGuard:
    """Interrupts the tasks waiting on an AMQP channel when that channel closes or their deadline passes.

    A connection that dies never drains its write queue, so a publish or ack blocked on it (or awaiting a
    confirm the broker will never send) would wait forever; the guard cancels such waits and :meth:`wait`
    turns them into ``ChannelInvalidStateError`` (retried or reported by the caller) or ``TimeoutError``.
    One sweeper timer checks deadlines about once a second, so a wait costs no timer of its own.
    """

    SWEEP_INTERVAL = 0.5

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Task[Any], tuple[aiormq.abc.AbstractChannel, float | None]] = {}
        self._interrupted: dict[asyncio.Task[Any], type[Exception]] = {}
        self._watched: set[int] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def wait(self, channel: aiormq.abc.AbstractChannel, operation: Any, deadline: float | None = None) -> Any:
        """Await ``operation`` (a coroutine using ``channel``) unless the channel closes or ``deadline`` passes."""
        task = asyncio.current_task()
        assert task is not None
        if id(channel) not in self._watched:
            self._watched.add(id(channel))
            channel.closing.add_done_callback(lambda _: self._closed(channel))
        if channel.is_closed:
            operation.close()
            raise amqp_errors.ChannelInvalidStateError("channel closed")
        self._waiting[task] = (channel, deadline)
        if deadline is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.SWEEP_INTERVAL, self._sweep)
        try:
            return await operation
        except asyncio.CancelledError:
            reason = self._interrupted.pop(task, None)
            if reason is not None:
                task.uncancel()
                raise reason("channel closed while waiting on it") from None
            raise
        finally:
            self._waiting.pop(task, None)

    def _interrupt(self, task: asyncio.Task[Any], reason: type[Exception]) -> None:
        if not task.done() and task not in self._interrupted:
            self._interrupted[task] = reason
            task.cancel()

    def _closed(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._watched.discard(id(channel))
        for task, (waiting_on, _) in list(self._waiting.items()):
            if waiting_on is channel:
                self._interrupt(task, amqp_errors.ChannelInvalidStateError)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = False
        for task, (_, deadline) in list(self._waiting.items()):
            if deadline is None:
                continue
            if now >= deadline:
                self._interrupt(task, TimeoutError)
            else:
                pending = True
        if pending:
            self._sweeper = loop.call_later(self.SWEEP_INTERVAL, self._sweep)

    def cancel(self) -> None:
        """Stop the sweeper (the broker is closing)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

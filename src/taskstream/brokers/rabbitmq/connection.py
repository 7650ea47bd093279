"""One robust AMQP connection with its publisher and admin channels, and the watch over its outages.

aio-pika's robust connection reconnects by itself; this module adds what taskstream needs around it: failover
over the hosts of a cluster URL (``amqp://u:p@h1,h2,h3/vhost``: the first connect tries them in order, every
reconnect attempt after a loss or a failed attempt goes to the next host, round robin), a bounded first connect
and bounded reconnect attempts, a publisher channel in confirm mode, an admin channel for declarations and queue
management (a refused declaration closes only that one), the replay of declarations once the connection is back
(on whichever node it reached), and the verdict that the broker is gone after ``reconnect_timeout`` without a
connection to any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiormq
from aio_pika import RobustConnection
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from yarl import URL

from taskstream.brokers.rabbitmq.channels import RETRYABLE, ChannelGuard, lost_with_channel, map_error
from taskstream.brokers.rabbitmq.config import RabbitMQConfig, split_hosts
from taskstream.errors import BrokerConnectionError, BrokerError
from taskstream.settings import redact_url

__all__ = ["ConnectionManager", "FailoverConnection"]

log = logging.getLogger("taskstream.brokers.rabbitmq")


class FailoverConnection(RobustConnection):
    """aio-pika's robust connection over a list of hosts: after a lost connection or a failed attempt, the next
    attempt goes to the next host (round robin); channels, consumers and declarations are restored on it.

    aio-pika calls ``_on_connection_close`` both when an open connection closes and when an attempt fails, and
    reads ``self.url`` at every attempt: moving ``url`` there is the whole failover.

    Args:
        urls: one driver URL per host (:func:`~taskstream.brokers.rabbitmq.config.split_hosts`).
        start: the index of the host tried first.
    """

    def __init__(self, urls: Sequence[str], start: int = 0) -> None:
        if not urls:
            raise ValueError("FailoverConnection needs at least one URL")
        super().__init__(URL(urls[start]))
        self.urls = list(urls)
        self.index = start

    @property
    def current_url(self) -> str:
        """The URL of the host this connection is on (or tries next); redact it before showing it."""
        return self.urls[self.index]

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        await super()._on_connection_close(closing)
        if len(self.urls) > 1 and not (self._close_called or self.is_closed):
            self.index = (self.index + 1) % len(self.urls)
            self.url = URL(self.urls[self.index])


class ConnectionManager:
    """The broker's connection, its long-lived channels and the guard on waits for them.

    Args:
        url: the driver's URL (with aio-pika's options), one host or a comma-separated host list; never logged
            without :func:`redact_url`.
        config: the broker's options.
        on_restored: awaited after a reconnect (declares exchanges and queues again).
        on_gone: called once the connection has been down for ``reconnect_timeout`` (wakes subscriptions).
    """

    def __init__(
        self,
        url: str,
        config: RabbitMQConfig,
        on_restored: Callable[[], Awaitable[None]],
        on_gone: Callable[[], None],
    ) -> None:
        self.url = url
        self.config = config
        self.guard = ChannelGuard()
        self.gone: BrokerConnectionError | None = None
        self.closed = False
        self._on_restored = on_restored
        self._on_gone = on_gone
        self._hosts = split_hosts(url)
        self._connection: FailoverConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._pub_underlay: aiormq.abc.AbstractChannel | None = None
        self._admin: aiormq.abc.AbstractChannel | None = None
        self._admin_lock = asyncio.Lock()  # opening the admin channel
        self._admin_calls = asyncio.Lock()  # one admin call at a time (see admin_call)
        self._connect_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._restoring: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Open the robust connection and the publisher channel (a no-op when already connected)."""
        async with self._connect_lock:
            if self._connection is not None:
                return
            self.closed = False
            connection = await self._first_connection()
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            try:
                publisher = connection.channel(publisher_confirms=True)
                await publisher.initialize()
                self._pub_underlay = await publisher.get_underlay_channel()
            except Exception as exc:
                await connection.close()
                raise map_error(exc, "cannot open a RabbitMQ channel") from exc
            self._connection = connection
            self._publisher = publisher
            self.gone = None

    async def _first_connection(self) -> FailoverConnection:
        """Connect to the first host that answers, trying them in the order written (each within
        ``connect_timeout``); the connection's later attempts go round robin from there."""
        failures: list[str] = []
        for index, host_url in enumerate(self._hosts):
            connection = FailoverConnection(self._hosts, index)
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await connection.connect(timeout=self.config.connect_timeout)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await connection.close()
                reason = (
                    f"no answer within {self.config.connect_timeout} s"
                    if isinstance(exc, TimeoutError)
                    else f"{type(exc).__name__}: {exc}"
                )
                if len(self._hosts) == 1:
                    raise BrokerConnectionError(
                        f"cannot connect to RabbitMQ at {redact_url(host_url)}: {reason}"
                    ) from exc
                log.warning("cannot connect to RabbitMQ at %s (%s); trying the next host", redact_url(host_url), reason)
                failures.append(f"{redact_url(host_url)}: {reason}")
                continue
            if index:
                log.info("connected to RabbitMQ at %s", redact_url(host_url))
            return connection
        raise BrokerConnectionError(
            f"cannot connect to any of the {len(self._hosts)} RabbitMQ hosts: {'; '.join(failures)}"
        )

    async def close(self) -> None:
        """Stop watching, close the connection and forget its channels (``closed`` is set first by the broker)."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._stop_restoring()
        self.guard.cancel()
        connection, self._connection = self._connection, None
        self._publisher = self._pub_underlay = self._admin = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    # -- outages --------------------------------------------------------------------------------------

    def _on_connection_lost(self, connection: Any, exc: BaseException | None) -> None:
        self._stop_restoring()  # its declarations were on the connection that just died
        if self.closed or self._watchdog is not None:
            return
        lost = self._connection.current_url if self._connection is not None else self.url
        others = " (or another host of the list)" if len(self._hosts) > 1 else ""
        log.warning("RabbitMQ connection to %s lost (%s); reconnecting%s", redact_url(lost), exc, others)
        self._watchdog = asyncio.get_running_loop().create_task(self._give_up_later())

    async def _give_up_later(self) -> None:
        await asyncio.sleep(self.config.reconnect_timeout)
        self.gone = BrokerConnectionError(
            f"RabbitMQ at {redact_url(self.url)} unreachable for {self.config.reconnect_timeout} s; giving up"
        )
        log.error("%s", self.gone)
        self._on_gone()

    async def _on_reconnected(self, connection: Any) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.gone = None
        reached = self._connection.current_url if self._connection is not None else self.url
        log.info("RabbitMQ connection restored, to %s", redact_url(reached))
        # Not awaited here: aio-pika awaits this callback inside its reconnect loop, and declarations that wait
        # on a connection lost meanwhile would hold that loop (no next reconnect) until their timeout.
        self._stop_restoring()
        self._restoring = asyncio.get_running_loop().create_task(self._restore())

    async def _restore(self) -> None:
        try:
            await self._on_restored()
        except Exception:
            log.exception("restoring RabbitMQ declarations after a reconnect failed")

    def _stop_restoring(self) -> None:
        restoring, self._restoring = self._restoring, None
        if restoring is not None and not restoring.done():
            restoring.cancel()

    # -- channels -------------------------------------------------------------------------------------

    async def ready(self) -> AbstractRobustConnection:
        """The connection (connecting first if needed); raises once the broker is closed or gone."""
        if self._connection is None:
            if self.closed:
                raise BrokerConnectionError("the RabbitMQ broker is closed")
            await self.connect()
        assert self._connection is not None
        if self.gone is not None:
            raise self.gone
        return self._connection

    def open_publish_channel(self) -> aiormq.abc.AbstractChannel | None:
        """The publisher channel if it is open now, else ``None`` (then await :meth:`publish_channel`)."""
        underlay = self._pub_underlay
        if underlay is None or underlay.is_closed:
            return None
        return underlay

    async def publish_channel(self) -> aiormq.abc.AbstractChannel:
        """The publisher channel (confirm mode), waiting for it to reopen after a reconnect."""
        underlay = self._pub_underlay
        if underlay is not None and not underlay.is_closed:
            return underlay
        await self.ready()
        publisher = self._publisher
        if publisher is None:
            raise BrokerConnectionError("the RabbitMQ broker is closed")
        while True:
            await publisher.ready()
            underlay = await publisher.get_underlay_channel()
            if not underlay.is_closed:
                self._pub_underlay = underlay
                return underlay
            await asyncio.sleep(0.05)

    async def _admin_channel(self) -> aiormq.abc.AbstractChannel:
        admin = self._admin
        if admin is not None and not admin.is_closed:
            return admin
        async with self._admin_lock:
            admin = self._admin
            if admin is not None and not admin.is_closed:
                return admin
            connection = await self.ready()
            await connection.ready()
            transport = connection.transport
            if transport is None:
                raise BrokerConnectionError("RabbitMQ connection is not ready")
            self._admin = await transport.connection.channel(publisher_confirms=False)
            return self._admin

    async def admin_call(self, what: str, op: Callable[[Any], Awaitable[Any]], *, resend: bool = True) -> Any:
        """Run ``op(channel)`` on the admin channel, mapping errors; a refused op reopens the channel.

        A connection lost during the call is waited out like a publish: the call is made again once the
        connection is back (declarations and reads are idempotent), until ``publish_timeout``.

        Args:
            what: the start of the error message (``"cannot declare RabbitMQ queue 'q'"``).
            op: the operation, given the admin channel.
            resend: ``False`` for an operation that must not run twice (a purge): a lost connection fails it.

        Raises:
            BrokerConnectionError: no answer within ``publish_timeout``, or the connection is gone.
            BrokerError: the server refused the operation (``QueueNotFound`` for a missing queue).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.publish_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline), self._admin_calls:
                    # One call at a time: a refused call closes the admin channel, and every call waiting on it
                    # would fail with the refusal of another (a depth read of a missing queue failing a declare).
                    channel = await self._admin_channel()
                    return await op(channel)
            except BrokerConnectionError:
                if not resend or self.closed or self.gone is not None or self._connection is None:
                    raise  # closed, given up, or never connected (a first connect that failed says so at once)
                await asyncio.sleep(0.05)  # the connection died again before the admin channel opened
            except BrokerError:
                raise
            except TimeoutError as exc:
                raise BrokerConnectionError(
                    f"{what}: no answer from RabbitMQ within {self.config.publish_timeout} s"
                ) from exc
            except Exception as exc:
                bare = lost_with_channel(exc, self._admin)
                if (bare or isinstance(exc, RETRYABLE)) and resend and not self.closed and self.gone is None:
                    await asyncio.sleep(0.05)  # the robust connection reconnects; then the call is made again
                    continue
                if bare:
                    raise BrokerConnectionError(f"{what}: the connection was lost ({type(exc).__name__})") from exc
                raise map_error(exc, what) from exc

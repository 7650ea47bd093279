"""One robust AMQP connection with its publisher and admin channels, and the watch over its outages.

aio-pika's robust connection reconnects by itself; this module adds what taskstream needs around it: a bounded
first connect, a publisher channel in confirm mode, an admin channel for declarations and queue management (a
refused declaration closes only that one), the replay of declarations once the connection is back, and the
verdict that the broker is gone after ``reconnect_timeout`` without a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from taskstream.brokers.rabbitmq.channels import ChannelGuard, map_error
from taskstream.brokers.rabbitmq.config import RabbitMQConfig
from taskstream.errors import BrokerConnectionError, BrokerError
from taskstream.settings import redact_url

__all__ = ["ConnectionManager"]

log = logging.getLogger("taskstream.brokers.rabbitmq")


class ConnectionManager:
    """The broker's connection, its long-lived channels and the guard on waits for them.

    Args:
        url: the driver's URL (with aio-pika's options); never logged without :func:`redact_url`.
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
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._pub_underlay: aiormq.abc.AbstractChannel | None = None
        self._admin: aiormq.abc.AbstractChannel | None = None
        self._admin_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Open the robust connection and the publisher channel (a no-op when already connected)."""
        async with self._connect_lock:
            if self._connection is not None:
                return
            self.closed = False
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    connection = await aio_pika.connect_robust(self.url)
            except TimeoutError as exc:
                raise BrokerConnectionError(
                    f"cannot connect to RabbitMQ at {redact_url(self.url)} within {self.config.connect_timeout} s"
                ) from exc
            except Exception as exc:
                raise BrokerConnectionError(
                    f"cannot connect to RabbitMQ at {redact_url(self.url)}: {type(exc).__name__}: {exc}"
                ) from exc
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

    async def close(self) -> None:
        """Stop watching, close the connection and forget its channels (``closed`` is set first by the broker)."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.guard.cancel()
        connection, self._connection = self._connection, None
        self._publisher = self._pub_underlay = self._admin = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    # -- outages --------------------------------------------------------------------------------------

    def _on_connection_lost(self, connection: Any, exc: BaseException | None) -> None:
        if self.closed or self._watchdog is not None:
            return
        log.warning("RabbitMQ connection to %s lost (%s); reconnecting", redact_url(self.url), exc)
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
        log.info("RabbitMQ connection to %s restored", redact_url(self.url))
        await self._on_restored()

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

    async def admin_call(self, what: str, op: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run ``op(channel)`` on the admin channel, mapping errors; a refused op reopens the channel.

        Args:
            what: the start of the error message (``"cannot declare RabbitMQ queue 'q'"``).
            op: the operation, given the admin channel.

        Raises:
            BrokerConnectionError: no answer within ``publish_timeout``, or the connection is gone.
            BrokerError: the server refused the operation (``QueueNotFound`` for a missing queue).
        """
        try:
            async with asyncio.timeout(self.config.publish_timeout):
                channel = await self._admin_channel()
                return await op(channel)
        except BrokerError:
            raise
        except TimeoutError as exc:
            raise BrokerConnectionError(
                f"{what}: no answer from RabbitMQ within {self.config.publish_timeout} s"
            ) from exc
        except Exception as exc:
            raise map_error(exc, what) from exc

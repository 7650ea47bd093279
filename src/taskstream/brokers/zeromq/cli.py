"""The ``taskstream zmq-device`` verb. Imports pyzmq only when it runs, so it can say what to install."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Annotated

import typer

from taskstream.brokers.zeromq.config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_LIVENESS,
    ZEROMQ_MAX_MESSAGE_BYTES,
    DeviceConfig,
    endpoint_url,
    require_zmq,
)
from taskstream.errors import ConfigurationError

if TYPE_CHECKING:
    from taskstream.brokers.zeromq.device import ZmqDevice
    from taskstream.brokers.zeromq.forwarder import Forwarder

__all__ = ["register"]


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
            ZEROMQ_MAX_MESSAGE_BYTES
        ),
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Run the ZeroMQ queue device (and the topic forwarder) until SIGINT or SIGTERM.

        Queues live in this process's memory: messages it holds are lost if it dies (not durable).
        """
        require_zmq()
        from taskstream.brokers.zeromq.runner import run_device  # needs pyzmq, checked just above

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

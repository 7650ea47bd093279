"""``taskstream console``: serve the live web console (registered by :func:`taskstream.observe.cli.register`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Annotated

import typer

from taskstream.errors import ConfigurationError, MissingExtraError

__all__ = ["console_command"]


def _check_extra() -> None:
    for module in ("aiohttp", "jinja2"):
        try:
            __import__(module)
        except ImportError as exc:
            raise MissingExtraError("web console", "console", module) from exc


def console_command(
    broker: Annotated[
        str | None, typer.Option("--broker", help="Broker URL (default TASKSTREAM_BROKER_URL).", show_default=False)
    ] = None,
    app: Annotated[str | None, typer.Option("--app", help="module:app whose queues and pipelines to show.")] = None,
    pipeline: Annotated[
        list[str] | None, typer.Option("--pipeline", help="module:pipeline to draw with live figures (repeatable).")
    ] = None,
    queue: Annotated[list[str] | None, typer.Option("--queue", help="Another queue to show (repeatable).")] = None,
    result_store: Annotated[
        str | None,
        typer.Option("--result-store", help="Result store URL for tasks by id (default TASKSTREAM_RESULT_STORE_URL)."),
    ] = None,
    metrics_url: Annotated[
        list[str] | None,
        typer.Option("--metrics-url", help="Prometheus endpoint whose per-queue counters give rates (repeatable)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8089,
    refresh: Annotated[float, typer.Option("--refresh", help="Seconds between two samples of the queues.")] = 1.0,
) -> None:
    """Serve a live web console: queues, dead letters (replay, purge), tasks by id, pipeline graphs."""
    _check_extra()
    from taskstream.cli import QUIET_LOGGERS, load_object
    from taskstream.observe.console.config import config_for
    from taskstream.observe.console.server import run_console

    url = broker or os.environ.get("TASKSTREAM_BROKER_URL")
    if not url:
        raise ConfigurationError("no broker: give --broker URL or set TASKSTREAM_BROKER_URL")
    os.environ["TASKSTREAM_BROKER_URL"] = url  # read when the modules build their App
    store_url = result_store or os.environ.get("TASKSTREAM_RESULT_STORE_URL") or None
    config = config_for(
        url,
        app=load_object(app) if app else None,
        pipelines=[load_object(target) for target in pipeline or []],
        queues=queue or [],
        result_store_url=store_url,
        metrics_urls=tuple(metrics_url or ()),
        host=host,
        port=port,
        refresh=refresh,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    if url.lower().startswith("memory://"):
        typer.echo(
            "note: a memory:// broker lives inside one process; this console sees only its own (empty) one",
            err=True,
        )

    def ready(address: str) -> None:
        typer.echo(f"taskstream console on {address} (Ctrl-C stops it)")
        sys.stdout.flush()

    asyncio.run(run_console(config, ready=ready))

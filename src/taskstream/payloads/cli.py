"""``taskstream payloads ...``: look into the payload store and expire leftovers.

=============================================================  ==================================================
Command                                                        Does
=============================================================  ==================================================
``taskstream payloads ls [--store URL]``                        lists blobs (key, size, age)
``taskstream payloads expire [--older-than SECONDS]``           deletes payload blobs older than that
                                                               (default ``TASKSTREAM_PAYLOAD_TTL``, 7 days)
=============================================================  ==================================================

``--store`` defaults to ``TASKSTREAM_PAYLOAD_STORE_URL`` (else the local directory). Run ``expire`` from cron or
a scheduled job; it removes payloads of dead letters that were purged, of topic publishes, and of publishers
that crashed between storing a payload and publishing its reference.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer

from taskstream.errors import ConfigurationError
from taskstream.payloads.base import BlobStore, blob_store_from_url
from taskstream.payloads.claimcheck import ClaimCheck
from taskstream.settings import Settings

__all__ = ["register"]

payloads_cli = typer.Typer(name="payloads", help="Large-payload store: list and expire.", no_args_is_help=True)

StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URL (default TASKSTREAM_PAYLOAD_STORE_URL, else local).")
]


def _store(url: str | None) -> BlobStore:
    store = blob_store_from_url(url) if url is not None else ClaimCheck.from_settings().store
    if store is None:
        raise ConfigurationError("payload offloading is disabled (TASKSTREAM_PAYLOAD_STORE_URL=none): no store")
    return store


@payloads_cli.command("ls")
def list_blobs(store: StoreOpt = None) -> None:
    """List the blobs in the store: key, bytes, age in seconds."""

    async def go() -> None:
        target = _store(store)
        now = time.time()
        count = total = 0
        async for info in target.list():
            count += 1
            total += info.size
            typer.echo(f"{info.key}\t{info.size}\t{now - info.modified:.0f}")
        typer.echo(f"{count} blob(s), {total} bytes in {target.location}", err=True)

    asyncio.run(go())


@payloads_cli.command()
def expire(
    store: StoreOpt = None,
    older_than: Annotated[
        float | None, typer.Option(help="Seconds; default TASKSTREAM_PAYLOAD_TTL (7 days).", min=0)
    ] = None,
) -> None:
    """Delete payload blobs last modified longer ago than ``--older-than`` seconds."""
    age = Settings().payload_ttl if older_than is None else older_than

    async def go() -> None:
        target = _store(store)
        removed = await target.expire(age)
        typer.echo(f"expired {removed} payload(s) older than {age:.0f} s in {target.location}")

    asyncio.run(go())


def register(cli: typer.Typer) -> None:
    """Add ``taskstream payloads`` to the main command line."""
    cli.add_typer(payloads_cli)

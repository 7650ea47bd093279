"""Azure Storage Queues (on Azurite, 127.0.0.1:10001) in the contract suite.

Azurite is started by ``scripts/services/azurite.sh`` (``make services`` / ``.ci/run``). The Azurite
development connection string (``UseDevelopmentStorage=true``) is what the brokers use, so the development
storage path is exercised on every run.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from taskstream.brokers.azure_queues import AzureQueueBroker, azure_queue_name
from taskstream.brokers.base import Broker
from tests.brokers.contract.backends import BackendSpec

AZURITE_HOST = "127.0.0.1"
AZURITE_QUEUE_PORT = 10001


def make(visibility_timeout: float | None = None) -> Broker:
    return AzureQueueBroker.from_url(
        "azurequeue://",
        connection_string="UseDevelopmentStorage=true",
        visibility_timeout=visibility_timeout or 30,
    )


def url(visibility_timeout: float | None = None) -> str:
    """What :func:`make` builds, as a URL for another process."""
    connection = quote("UseDevelopmentStorage=true", safe="")
    return f"azurequeue://?connection_string={connection}&visibility_timeout={visibility_timeout or 30}"


async def setup() -> None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(AZURITE_HOST, AZURITE_QUEUE_PORT), 5)
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(
            f"Azurite is not answering on {AZURITE_HOST}:{AZURITE_QUEUE_PORT} ({exc}); "
            "start it with: bash scripts/services/azurite.sh"
        ) from exc
    writer.close()
    await writer.wait_closed()


SPEC = BackendSpec(name="azure", make=make, queue_name=azure_queue_name, setup=setup, url=url)

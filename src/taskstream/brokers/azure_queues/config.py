"""Settings of the Azure Storage Queues backend: limits, queue names, URL options, connection strings."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential

from taskstream.constants import AZURE_QUEUE_MAX_MESSAGE_BYTES
from taskstream.errors import ConfigurationError
from taskstream.settings import redact_url
from taskstream.urloptions import Option, URLOptions, split_query

__all__ = [
    "AZURE_MAX_MESSAGE_TEXT",
    "AZURE_QUEUE_MAX_MESSAGE_BYTES",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DEVSTORE_ACCOUNT",
    "MIN_POLL_DELAY",
    "OPTIONS",
    "azure_queue_name",
    "broker_arguments",
    "endpoint_of",
    "native_queue_name",
    "parse_connection_string",
]

DEFAULT_VISIBILITY_TIMEOUT = 30
#: Azure's limit on one message's text, in bytes of UTF-8, after encoding.
AZURE_MAX_MESSAGE_TEXT = 65536
MAX_PAGE = 32
MAX_VISIBILITY = 7 * 24 * 3600
MIN_POLL_DELAY = 0.05
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_MAX_IN_FLIGHT = 32
POISON_SUFFIX = "-poison"
DEVSTORE_ACCOUNT = "devstoreaccount1"
# Azurite's published, well-known development key (not a secret; documented by Microsoft for the emulator).
DEVSTORE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEVSTORE_PORT = 10001
QUEUE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# -- names ----------------------------------------------------------------------------------------------------


def azure_queue_name(name: str) -> str:
    """Turn any name into a valid Azure queue name that leaves room for the ``-poison`` suffix.

    Lowercases, replaces other characters by hyphens, collapses repeated hyphens, trims to 56 characters.

    Example:
        >>> azure_queue_name("Sensors.Readings_v2")
        'sensors-readings-v2'
    """
    cleaned = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cleaned = cleaned[: 63 - len(POISON_SUFFIX)].strip("-")
    while len(cleaned) < 3:
        cleaned = f"{cleaned}q" if cleaned else "qqq"
    return cleaned


def native_queue_name(name: str) -> str:
    """The Azure queue that stands for the taskstream queue ``name`` (what a plain Azure SDK client addresses).

    A valid Azure name is used as it is; any other is lower-cased and every run of other characters becomes one
    hyphen, the way the SQS backend maps dots, so the same App runs on every broker (``orders.in`` is the Azure
    queue ``orders-in``, its dead-letter queue ``orders-in-poison``). Nothing is cut: a name that is still not
    valid (3-63 characters) is refused.

    Example:
        >>> native_queue_name("Orders.In")
        'orders-in'

    Raises:
        ConfigurationError: the name does not map to a valid Azure queue name.
    """
    if QUEUE_NAME.fullmatch(name):
        return name
    native = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not QUEUE_NAME.fullmatch(native):
        raise ConfigurationError(
            f"invalid Azure queue name {name!r} (as {native!r}): Azure queue names are 3-63 lowercase letters, "
            "digits and single hyphens (taskstream lower-cases names and turns other characters into hyphens); "
            "taskstream.brokers.azure_queues.azure_queue_name() shortens a long name"
        )
    return native


def parse_connection_string(text: str) -> dict[str, str]:
    """The pieces of a connection string, names lower-cased.

    Raises:
        ConfigurationError: malformed, or without an account or a key (the message names no secret).
    """
    parts: dict[str, str] = {}
    for piece in text.strip().split(";"):
        if not piece.strip():
            continue
        name, sep, value = piece.partition("=")
        if not sep:
            raise ConfigurationError(
                "the Azure Storage connection string is malformed: expected 'Name=value' pairs separated by ';'"
            )
        parts[name.strip().lower()] = value.strip()
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return parts
    if "accountname" not in parts and "queueendpoint" not in parts:
        raise ConfigurationError(
            "the Azure Storage connection string has neither AccountName nor QueueEndpoint "
            "(or use 'UseDevelopmentStorage=true' for Azurite)"
        )
    if "accountkey" not in parts and "sharedaccesssignature" not in parts:
        raise ConfigurationError("the Azure Storage connection string has neither AccountKey nor SharedAccessSignature")
    return parts


def endpoint_of(parts: Mapping[str, str]) -> str:
    """The queue endpoint a parsed connection string points at (no secret in it)."""
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return f"http://127.0.0.1:{DEVSTORE_PORT}/{DEVSTORE_ACCOUNT}"
    if "queueendpoint" in parts:
        return parts["queueendpoint"].split("?", 1)[0].rstrip("/")
    protocol = parts.get("defaultendpointsprotocol", "https")
    suffix = parts.get("endpointsuffix", "core.windows.net")
    return f"{protocol}://{parts['accountname']}.queue.{suffix}"


OPTIONS = URLOptions(
    "Azure queue",
    [
        Option("visibility_timeout", "duration", DEFAULT_VISIBILITY_TIMEOUT, "seconds a received message stays hidden"),
        Option("poll_interval", "duration", DEFAULT_POLL_INTERVAL, "longest sleep between polls of an empty queue"),
        Option("message_ttl", "int", -1, "seconds a message lives (-1: never expires)"),
        Option("max_message_bytes", "int", AZURE_QUEUE_MAX_MESSAGE_BYTES, "largest body accepted"),
        Option("max_in_flight", "int", DEFAULT_MAX_IN_FLIGHT, "concurrent sends of one publish_batch"),
        Option("foreign_encoding", "str", "text", "how other producers' messages are read: text or base64"),
        Option("api_version", "str", None, "the Storage API version the SDK speaks"),
        Option("connection_string", "str", None, "an Azure Storage connection string", secret=True),
        Option("credential", "any", None, "account key, SAS token or azure-identity credential", secret=True),
        Option("host", "str", None, "Azurite's host for azurequeue://devstorage (default 127.0.0.1)"),
        Option("secure", "bool", None, "https (default: yes except for loopback hosts)"),
    ],
)
_CONNECTION = ("connection_string", "credential", "host", "secure")


def _devstorage(host: str | None, port: int | None) -> str:
    endpoint = f"http://{host or '127.0.0.1'}:{port or DEVSTORE_PORT}/{DEVSTORE_ACCOUNT}"
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEVSTORE_ACCOUNT};AccountKey={DEVSTORE_KEY};"
        f"QueueEndpoint={endpoint};"
    )


def _credential(credential: Any, account: str | None, host: str, password: str | None) -> Any:
    """The credential of an account URL: given, the URL's key, ``$AZURE_STORAGE_KEY``, ``$AZURE_STORAGE_SAS_TOKEN``."""
    if credential is None and password:
        credential = AzureNamedKeyCredential(account or host.split(".")[0], unquote(password))
    if credential is None and os.environ.get("AZURE_STORAGE_KEY"):
        name = account or os.environ.get("AZURE_STORAGE_ACCOUNT") or host.split(".")[0]
        credential = AzureNamedKeyCredential(name, os.environ["AZURE_STORAGE_KEY"])
    if credential is None and os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
        credential = AzureSasCredential(os.environ["AZURE_STORAGE_SAS_TOKEN"].lstrip("?"))
    if isinstance(credential, str):  # a key, or a SAS token (starts with sv= / ?sv=)
        secret = credential.lstrip("?")
        if "sig=" in secret:
            return AzureSasCredential(secret)
        return AzureNamedKeyCredential(account or host.split(".")[0], secret)
    return credential


def broker_arguments(url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``AzureQueueBroker`` for an ``azurequeue://`` URL; ``options`` win over the query.

    Raises:
        ConfigurationError: a bad URL, an unknown parameter or value, or no way to authenticate.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"bad Azure queue URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme.lower() != "azurequeue":
        raise ConfigurationError(f"not an azurequeue:// URL: {redact_url(url)!r}")
    # Plain percent-decoding (split_query): account keys and SAS tokens contain '+' that must survive.
    values = OPTIONS.parse(split_query(parts.query), options, url=url)
    tuning = {name: value for name, value in values.items() if name not in _CONNECTION}
    host = parts.hostname or ""
    if values.get("connection_string"):
        return {"connection_string": str(values["connection_string"]), **tuning}
    if host.lower() == "devstorage":
        return {"connection_string": _devstorage(values.get("host"), port), **tuning}
    if not host:
        env = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if not env:
            raise ConfigurationError(
                "azurequeue:// without a host needs a connection string: pass connection_string=... "
                "or set AZURE_STORAGE_CONNECTION_STRING (or use azurequeue://devstorage for Azurite)"
            )
        return {"connection_string": env, **tuning}
    secure = values.get("secure")
    use_https = bool(secure) if secure is not None else host.lower() not in _LOOPBACK
    netloc = parts.netloc.rsplit("@", 1)[-1]
    account_url = f"{'https' if use_https else 'http'}://{netloc}{parts.path.rstrip('/')}"
    account = unquote(parts.username) if parts.username else None
    credential = _credential(values.get("credential"), account, host, parts.password)
    return {"account_url": account_url, "credential": credential, **tuning}

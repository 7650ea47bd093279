"""Settings of the ZeroMQ backend: defaults, the broker's and the device's config models, endpoints and URLs.

Nothing here imports pyzmq, so the ``zmq-device`` verb and URL parsing work (and fail clearly) without it.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskstream.constants import ZEROMQ_MAX_MESSAGE_BYTES
from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.settings import redact_url
from taskstream.urloptions import Option, URLOptions

__all__ = [
    "ZEROMQ_MAX_MESSAGE_BYTES",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_LIVENESS",
    "DEFAULT_HWM",
    "DEFAULT_PUBSUB_HWM",
    "DEFAULT_REQUEST_TIMEOUT",
    "OPTIONS",
    "DeviceConfig",
    "ZeroMQConfig",
    "check_endpoint",
    "config_from_url",
    "endpoint_from_url",
    "endpoint_url",
    "require_zmq",
]

DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_LIVENESS = 5
DEFAULT_HWM = 10_000
DEFAULT_PUBSUB_HWM = 100_000
DEFAULT_REQUEST_TIMEOUT = 10.0

#: The options of a ``zmq://`` URL (docs/brokers.md, section ZeroMQ, lists them).
OPTIONS = URLOptions(
    "zmq",
    [
        Option("heartbeat", "duration", DEFAULT_HEARTBEAT_INTERVAL, "seconds between heartbeats to the device"),
        Option("heartbeat_interval", "duration", DEFAULT_HEARTBEAT_INTERVAL, "the same as heartbeat"),
        Option("liveness", "int", DEFAULT_HEARTBEAT_LIVENESS, "missed heartbeats before the device requeues"),
        Option("heartbeat_liveness", "int", DEFAULT_HEARTBEAT_LIVENESS, "the same as liveness"),
        Option("request_timeout", "duration", DEFAULT_REQUEST_TIMEOUT, "seconds to wait for the device's answer"),
        Option("max_message_bytes", "int", ZEROMQ_MAX_MESSAGE_BYTES, "largest message body published"),
        Option("hwm", "int", DEFAULT_HWM, "high-water mark of the DEALER socket (messages)"),
    ],
)
# URL option -> ZeroMQConfig field, for the short names
_FIELDS = {"heartbeat": "heartbeat_interval", "liveness": "heartbeat_liveness"}


def require_zmq() -> None:
    """Raise :class:`MissingExtraError` naming the ``pip install`` when pyzmq is missing."""
    try:
        importlib.import_module("zmq.asyncio")
    except ImportError as exc:
        raise MissingExtraError("zmq", "zmq", "pyzmq") from exc


class ZeroMQConfig(BaseModel):
    """Tuning of one :class:`~taskstream.brokers.zeromq.ZeroMQBroker` connection.

    Attributes:
        heartbeat_interval: seconds between heartbeats to the device.
        heartbeat_liveness: missed heartbeats after which the device requeues this connection's unacked
            messages (so a consumer whose process died loses its messages to others after
            ``heartbeat_interval * heartbeat_liveness`` seconds at most).
        request_timeout: seconds to wait for the device to answer a request before
            :class:`~taskstream.errors.BrokerConnectionError`.
        max_message_bytes: largest message body published.
        hwm: high-water mark of the DEALER socket (messages); sends wait when it is reached, never drop.
    """

    model_config = ConfigDict(frozen=True)

    heartbeat_interval: float = Field(DEFAULT_HEARTBEAT_INTERVAL, gt=0)
    heartbeat_liveness: int = Field(DEFAULT_HEARTBEAT_LIVENESS, ge=1)
    request_timeout: float = Field(DEFAULT_REQUEST_TIMEOUT, gt=0)
    max_message_bytes: int = Field(ZEROMQ_MAX_MESSAGE_BYTES, gt=0)
    hwm: int = Field(DEFAULT_HWM, ge=0)


class DeviceConfig(BaseModel):
    """Tuning of a :class:`~taskstream.brokers.zeromq.ZmqDevice`.

    Attributes:
        heartbeat_interval: seconds between the device's heartbeats to each client (and the interval assumed
            for a client that did not say).
        heartbeat_liveness: missed heartbeat intervals after which a silent client is declared dead and its
            unacked messages are requeued.
        hwm: high-water mark (messages) of the ROUTER socket, each way.
        max_message_bytes: largest body the device accepts.
        delivery_batch: most messages sent to one consumer in one multipart frame.
    """

    model_config = ConfigDict(frozen=True)

    heartbeat_interval: float = Field(DEFAULT_HEARTBEAT_INTERVAL, gt=0)
    heartbeat_liveness: int = Field(DEFAULT_HEARTBEAT_LIVENESS, ge=1)
    hwm: int = Field(DEFAULT_HWM, ge=0)
    max_message_bytes: int = Field(ZEROMQ_MAX_MESSAGE_BYTES, gt=0)
    delivery_batch: int = Field(512, ge=1)


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` if it is a ``tcp://`` or ``ipc://`` ZeroMQ address, else raise ConfigurationError."""
    if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://")) or len(endpoint) <= 6:
        raise ConfigurationError(f"bad ZeroMQ endpoint {endpoint!r}: expected tcp://HOST:PORT or ipc:///path/to/socket")
    return endpoint


def endpoint_from_url(url: str) -> str:
    """The ZeroMQ endpoint of a ``zmq://`` URL.

    Example:
        >>> endpoint_from_url("zmq://127.0.0.1:5555")
        'tcp://127.0.0.1:5555'
        >>> endpoint_from_url("zmq://ipc/tmp/taskstream.sock")
        'ipc:///tmp/taskstream.sock'
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"bad zmq URL {url!r}: {exc}") from exc
    if parts.scheme != "zmq":
        raise ConfigurationError(f"bad zmq URL {url!r}: the scheme must be zmq://")
    if parts.netloc == "ipc":
        path = unquote(parts.path)
        if not path or path == "/":
            raise ConfigurationError(f"bad zmq URL {url!r}: zmq://ipc/PATH needs a socket path")
        return "ipc://" + path
    if not parts.hostname or port is None:
        raise ConfigurationError(f"bad zmq URL {url!r}: expected zmq://HOST:PORT or zmq://ipc/PATH")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"tcp://{host}:{port}"


def endpoint_url(endpoint: str) -> str:
    """The ``zmq://`` broker URL for a device endpoint.

    Example:
        >>> endpoint_url("tcp://127.0.0.1:5555")
        'zmq://127.0.0.1:5555'
        >>> endpoint_url("ipc:///tmp/taskstream.sock")
        'zmq://ipc/tmp/taskstream.sock'
    """
    if endpoint.startswith("tcp://"):
        return "zmq://" + endpoint[len("tcp://") :]
    if endpoint.startswith("ipc://"):
        return "zmq://ipc/" + endpoint[len("ipc://") :].lstrip("/")
    raise ConfigurationError(f"bad ZeroMQ endpoint {endpoint!r}")


def config_from_url(url: str, **options: Any) -> ZeroMQConfig:
    """The :class:`ZeroMQConfig` of ``zmq://HOST:PORT?heartbeat=1&liveness=5``; ``options`` override the query.

    Raises:
        ConfigurationError: an unknown option (named, with a "did you mean" and the known ones) or a bad value.
    """
    values = OPTIONS.parse(urlsplit(url).query, options, url=url)
    params = {_FIELDS.get(name, name): value for name, value in values.items()}
    try:
        return ZeroMQConfig(**params)
    except ValidationError as exc:
        raise ConfigurationError(f"bad zmq URL {redact_url(url)!r}: {exc.errors()[0]['msg']}") from exc

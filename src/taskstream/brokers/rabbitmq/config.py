"""Options of the RabbitMQ backend: defaults, the config model and the URL's query string.

The table of options with their defaults is in ``docs/brokers.md`` (section RabbitMQ).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskstream.errors import ConfigurationError
from taskstream.settings import redact_url

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_RECONNECT_INTERVAL",
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_TOPIC_EXCHANGE",
    "RabbitMQConfig",
    "parse_url",
]

DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
DEFAULT_PUBLISH_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RECONNECT_TIMEOUT = 300.0
DEFAULT_RECONNECT_INTERVAL = 1.0
DEFAULT_TOPIC_EXCHANGE = "taskstream.topics"


class RabbitMQConfig(BaseModel):
    """Options of one RabbitMQ broker (the URL's query string, or keyword options of ``from_url``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_type: Literal["classic", "quorum"] = "classic"
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    persistent: bool = True
    durable: bool = True
    publish_timeout: float = Field(DEFAULT_PUBLISH_TIMEOUT, gt=0)
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    reconnect_timeout: float = Field(DEFAULT_RECONNECT_TIMEOUT, gt=0)
    reconnect_interval: float = Field(DEFAULT_RECONNECT_INTERVAL, gt=0)
    topic_exchange: str = DEFAULT_TOPIC_EXCHANGE


_OWN_OPTIONS = frozenset(RabbitMQConfig.model_fields)


def parse_url(url: str, options: dict[str, Any]) -> tuple[str, RabbitMQConfig]:
    """Split an AMQP URL into the driver's URL and taskstream's options.

    taskstream's own options are taken out of the query string (``options`` override them); the rest (aio-pika's
    ``heartbeat``, ``name``, TLS files, ...) stay in the URL handed to the driver, with ``reconnect_interval``
    added when the URL does not set it.

    Args:
        url: ``amqp://user:pass@host:port/vhost?options`` (or ``amqps://``).
        options: keyword options that override the query string.

    Returns:
        The URL for aio-pika and the validated config.

    Raises:
        ConfigurationError: not an AMQP URL, or an option that is unknown or out of range (the URL in the
            message has its password redacted).

    Example:
        >>> parse_url("amqp://guest:guest@127.0.0.1/?queue_type=quorum&heartbeat=5", {})[1].queue_type
        'quorum'
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {redact_url(url)!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    own: dict[str, Any] = {k: v for k, v in query if k in _OWN_OPTIONS}
    passthrough = [(k, v) for k, v in query if k not in _OWN_OPTIONS]
    own.update(options)
    try:
        config = RabbitMQConfig.model_validate(own)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"bad RabbitMQ URL {redact_url(url)!r}: {problems}") from None
    if not any(k == "reconnect_interval" for k, _ in passthrough):
        passthrough.append(("reconnect_interval", str(config.reconnect_interval)))
    driver_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(passthrough), ""))
    return driver_url, config

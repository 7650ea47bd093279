"""Options of the RabbitMQ backend: defaults, the config model, the URL's query string and its host list.

The table of options with their defaults is in ``docs/brokers.md`` (section RabbitMQ). A URL may name several
nodes of a cluster, ``amqp://user:pass@h1:5672,h2:5672,h3:5672/vhost``: :func:`split_hosts` gives one driver URL
per node, in the order written (the connection tries them in that order, then round robin).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskstream.constants import RABBITMQ_MAX_MESSAGE_BYTES
from taskstream.errors import ConfigurationError
from taskstream.settings import redact_url
from taskstream.urloptions import Option, URLOptions

__all__ = [
    "RABBITMQ_MAX_MESSAGE_BYTES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_RECONNECT_INTERVAL",
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_TOPIC_EXCHANGE",
    "DRIVER_OPTIONS",
    "OPTIONS",
    "RabbitMQConfig",
    "parse_url",
    "split_hosts",
]

DEFAULT_PUBLISH_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RECONNECT_TIMEOUT = 300.0
DEFAULT_RECONNECT_INTERVAL = 1.0
DEFAULT_TOPIC_EXCHANGE = "taskstream.topics"


class RabbitMQConfig(BaseModel):
    """Options of one RabbitMQ broker (the URL's query string, or keyword options of ``from_url``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_type: Literal["classic", "quorum"] = "classic"
    max_message_bytes: int = Field(RABBITMQ_MAX_MESSAGE_BYTES, gt=0)
    persistent: bool = True
    durable: bool = True
    publish_timeout: float = Field(DEFAULT_PUBLISH_TIMEOUT, gt=0)
    connect_timeout: float = Field(DEFAULT_CONNECT_TIMEOUT, gt=0)
    reconnect_timeout: float = Field(DEFAULT_RECONNECT_TIMEOUT, gt=0)
    reconnect_interval: float = Field(DEFAULT_RECONNECT_INTERVAL, gt=0)
    topic_exchange: str = DEFAULT_TOPIC_EXCHANGE


_OWN_OPTIONS = frozenset(RabbitMQConfig.model_fields)

#: aio-pika's and aiormq's own URL options (aio-pika 10, aiormq 7), handed to the driver.
DRIVER_OPTIONS = URLOptions(
    "RabbitMQ",
    [
        Option("name", "str", None, "connection name shown by the management UI (aiormq)"),
        Option("heartbeat", "str", "60", "AMQP heartbeat seconds, 0 to disable (aiormq)"),
        Option("timeout", "str", "60", "seconds for AMQP handshake steps (aiormq)"),
        Option("auth", "str", "plain", "SASL mechanism: plain, amqplain or external (aiormq)"),
        Option("cafile", "str", None, "CA certificate file (aiormq, TLS)"),
        Option("capath", "str", None, "CA certificate directory (aiormq, TLS)"),
        Option("cadata", "str", None, "CA certificates, URL-encoded (aiormq, TLS)"),
        Option("keyfile", "str", None, "client key file (aiormq, TLS)"),
        Option("certfile", "str", None, "client certificate file (aiormq, TLS)"),
        Option("no_verify_ssl", "str", "0", "1: do not verify the server certificate (aiormq, TLS)"),
        Option("interleave", "str", None, "address families interleaved when connecting (aio-pika)"),
        Option("happy_eyeballs_delay", "str", None, "seconds before the next address is tried (aio-pika)"),
        Option("fail_fast", "str", "1", "first connect fails at once instead of retrying (aio-pika)"),
    ],
)

#: Every option a RabbitMQ URL may carry: taskstream's (the config) and the driver's.
OPTIONS = URLOptions(
    "RabbitMQ",
    [
        Option("queue_type", "str", "classic", "classic or quorum queues"),
        Option("max_message_bytes", "int", RABBITMQ_MAX_MESSAGE_BYTES, "largest body published"),
        Option("persistent", "bool", True, "delivery_mode=2 on every message"),
        Option("durable", "bool", True, "durable queues"),
        Option("publish_timeout", "duration", DEFAULT_PUBLISH_TIMEOUT, "seconds a publish waits for its confirm"),
        Option("connect_timeout", "duration", DEFAULT_CONNECT_TIMEOUT, "seconds the first connect may take"),
        Option("reconnect_timeout", "duration", DEFAULT_RECONNECT_TIMEOUT, "seconds without a connection"),
        Option("reconnect_interval", "duration", DEFAULT_RECONNECT_INTERVAL, "seconds between reconnect attempts"),
        Option("topic_exchange", "str", DEFAULT_TOPIC_EXCHANGE, "topic exchange of publish_topic"),
        *DRIVER_OPTIONS,
    ],
)


def parse_url(url: str, options: dict[str, Any]) -> tuple[str, RabbitMQConfig]:
    """Split an AMQP URL into the driver's URL and taskstream's options.

    taskstream's own options are taken out of the query string (``options`` override them); aio-pika's
    (:data:`DRIVER_OPTIONS`: ``heartbeat``, ``name``, TLS files, ...) stay in the URL handed to the driver, with
    ``reconnect_interval`` from the config. Any other option is refused.

    Args:
        url: ``amqp://user:pass@host:port/vhost?options`` (or ``amqps://``).
        options: keyword options that override the query string.

    Returns:
        The URL for aio-pika and the validated config.

    Raises:
        ConfigurationError: not an AMQP URL, an empty host or a bad port in its host list, or an option that is
            unknown (named, with a "did you mean") or out of range (the URL in the message has its password
            redacted).

    Example:
        >>> parse_url("amqp://guest:guest@127.0.0.1/?queue_type=quorum&heartbeat=5", {})[1].queue_type
        'quorum'
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {redact_url(url)!r}")
    _check_hosts(url, parts.netloc)
    values = OPTIONS.parse(parts.query, options, url=url)
    try:
        config = RabbitMQConfig.model_validate({k: v for k, v in values.items() if k in _OWN_OPTIONS})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"bad RabbitMQ URL {redact_url(url)!r}: {problems}") from None
    driver = [(k, str(v)) for k, v in values.items() if k in DRIVER_OPTIONS.options]
    driver.append(("reconnect_interval", str(config.reconnect_interval)))
    driver_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(driver, quote_via=quote), ""))
    return driver_url, config


def _userinfo_and_hosts(netloc: str) -> tuple[str, list[str]]:
    userinfo, at, hostlist = netloc.rpartition("@")
    return (userinfo + at), hostlist.split(",")


def _check_hosts(url: str, netloc: str) -> None:
    """Raise :class:`ConfigurationError` naming the first empty host or bad port of ``netloc``'s host list."""
    _, hosts = _userinfo_and_hosts(netloc)
    for position, host in enumerate(hosts, 1):
        name, port = _host_and_port(host)
        if not name and len(hosts) > 1:  # one empty host is the driver's default (localhost)
            raise ConfigurationError(
                f"bad RabbitMQ URL {redact_url(url)!r}: host {position} of {len(hosts)} in the host list is empty "
                "(write amqp://user:pass@host1:5672,host2:5672/vhost)"
            )
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(
                f"bad RabbitMQ URL {redact_url(url)!r}: port {port!r} of host {name!r} is not a number from 1 to 65535"
            )


def _host_and_port(host: str) -> tuple[str, str | None]:
    """``"h:5672"`` -> ``("h", "5672")``; ``"[::1]:5672"`` -> ``("[::1]", "5672")``; no port -> ``None``."""
    if host.startswith("["):
        bracket = host.find("]")
        if bracket < 0:
            return "", None
        rest = host[bracket + 1 :]
        return host[: bracket + 1], (rest[1:] if rest.startswith(":") else None)
    name, colon, port = host.partition(":")
    return name, (port if colon else None)


def split_hosts(url: str) -> list[str]:
    """One URL per host of ``url``'s host list, each with the same user, password, vhost and query.

    Args:
        url: ``amqp://user:pass@h1:5672,h2:5672/vhost?options`` (one host is a list of one).

    Returns:
        The URLs in the order the hosts are written.

    Example:
        >>> split_hosts("amqp://u:p@h1:5672,h2:5673/v?heartbeat=5")
        ['amqp://u:p@h1:5672/v?heartbeat=5', 'amqp://u:p@h2:5673/v?heartbeat=5']
    """
    parts = urlsplit(url)
    userinfo, hosts = _userinfo_and_hosts(parts.netloc)
    return [urlunsplit((parts.scheme, userinfo + host, parts.path, parts.query, parts.fragment)) for host in hosts]

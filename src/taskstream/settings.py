"""Settings from ``TASKSTREAM_*`` environment variables (pydantic-settings).

=====================================  ==========================================  ===================
Variable                               Meaning                                     Default
=====================================  ==========================================  ===================
``TASKSTREAM_BROKER_URL``              broker URL (see ``broker_from_url``)         ``memory://``
``TASKSTREAM_RESULT_STORE_URL``        task result store (``sqlite:///path``,       none (in memory)
                                       ``redis://host:port/db``)
``TASKSTREAM_RESULT_TTL``              seconds results are kept                     ``86400``
``TASKSTREAM_MAX_ATTEMPTS``            deliveries before dead-letter                ``5``
``TASKSTREAM_PREFETCH``                unacked messages a consumer holds            ``64``
``TASKSTREAM_CONCURRENCY``             handlers running at once per consumer        ``16``
``TASKSTREAM_SHUTDOWN_GRACE``          seconds in-flight work may finish on stop    ``30``
``TASKSTREAM_MAX_MESSAGE_BYTES``       cap below the broker's own limit             none
``TASKSTREAM_SIGNING_KEY``             HMAC key for signed code shipping            none (refused)
``TASKSTREAM_PAYLOAD_STORE_URL``       blob store for large payloads: ``file://``,  local directory
                                       ``s3://``, ``azureblob://`` or ``none``
``TASKSTREAM_PAYLOAD_THRESHOLD``       offload envelopes over this many bytes       broker limit - 4 KiB
``TASKSTREAM_PAYLOAD_TTL``             age (s) at which leftovers may be expired    ``604800`` (7 days)
``TASKSTREAM_STATE_URL``               window snapshots of stream stages            SQLite file under
                                       (``sqlite:///path``, ``redis://...``)        ``.taskstream/``
=====================================  ==========================================  ===================

A variable that is set but empty (``TASKSTREAM_RESULT_STORE_URL=``, as compose files often leave them) means
unset: its default applies.

Secrets (``signing_key`` and every URL, which may carry a password or a key) are ``SecretStr``, and
:func:`redact_url` shows a URL without them: it keeps the user name and the query options known to be harmless
(:data:`NON_SECRET_QUERY_NAMES`) and replaces any password and every other query value with ``***``, so a
new driver option or a SAS token is hidden by default rather than leaked.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PREFETCH",
    "NON_SECRET_QUERY_NAMES",
    "URL_SETTINGS",
    "Settings",
    "env_name",
    "redact_url",
]

DEFAULT_BROKER_URL = "memory://"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_PREFETCH = 64
DEFAULT_CONCURRENCY = 16


class Settings(BaseSettings):
    """All process-wide settings; every field maps to ``TASKSTREAM_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TASKSTREAM_", frozen=True, extra="ignore", env_ignore_empty=True)

    broker_url: SecretStr = SecretStr(DEFAULT_BROKER_URL)
    result_store_url: SecretStr | None = None
    result_ttl: float = 86400.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    prefetch: int = DEFAULT_PREFETCH
    concurrency: int = DEFAULT_CONCURRENCY
    shutdown_grace: float = 30.0
    max_message_bytes: int | None = None
    signing_key: SecretStr | None = None
    payload_store_url: SecretStr | None = None
    payload_threshold: int | None = None
    payload_ttl: float = 7 * 86400.0
    state_url: SecretStr | None = None


#: The settings that hold URLs (any of them may carry a password or a key).
URL_SETTINGS: tuple[str, ...] = ("broker_url", "result_store_url", "payload_store_url", "state_url")


def env_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field.

    Example:
        >>> env_name("result_store_url")
        'TASKSTREAM_RESULT_STORE_URL'
    """
    return f"TASKSTREAM_{field.upper()}"


#: URL query options whose values are never secret: every option the brokers (memory, RabbitMQ and its driver,
#: SQS, Azure Storage Queues, ZeroMQ), the result, state and payload stores read, and the Redis client's
#: connection options. :func:`redact_url` shows these; any other query value is replaced by ``***``.
NON_SECRET_QUERY_NAMES: frozenset[str] = frozenset(
    {
        # shared
        "max_message_bytes",
        "visibility_timeout",
        "prefetch",
        "region",
        "region_name",
        "endpoint_url",
        "timeout",
        # SQS
        "profile",
        "queue_prefix",
        "wait_time",
        "max_receives",
        "max_receive_count",
        "create_queues",
        "max_connections",
        "close_grace",
        # RabbitMQ (taskstream's own options, then those aio-pika and aiormq read)
        "queue_type",
        "persistent",
        "durable",
        "publish_timeout",
        "connect_timeout",
        "reconnect_timeout",
        "reconnect_interval",
        "topic_exchange",
        "heartbeat",
        "name",
        "fail_fast",
        "frame_max",
        "channel_max",
        "auth",
        "cafile",
        "capath",
        "certfile",
        "keyfile",
        "no_verify_ssl",
        # Azure Storage Queues
        "host",
        "secure",
        "poll_interval",
        "message_ttl",
        "max_in_flight",
        "foreign_encoding",
        "api_version",
        # ZeroMQ
        "heartbeat_interval",
        "liveness",
        "heartbeat_liveness",
        "request_timeout",
        "hwm",
        # payload stores (s3://, azureblob://)
        "create",
        # Redis (result and state stores)
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "health_check_interval",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_ca_certs",
        "client_name",
        "decode_responses",
        "protocol",
    }
)


def _redact_query(query: str) -> str:
    pieces = []
    for piece in query.split("&"):
        name, eq, value = piece.partition("=")
        if unquote_plus(name).lower() not in NON_SECRET_QUERY_NAMES:
            pieces.append(f"{name}=***" if eq else ("***" if piece else piece))
            continue
        plain = unquote_plus(value)
        if "://" in plain and (inner := redact_url(plain)) != plain:
            value = inner  # a URL-valued option (endpoint_url) with a password inside
        pieces.append(f"{name}{eq}{value}")
    return "&".join(pieces)


def redact_url(url: str) -> str:
    """Return ``url`` with any password and every query value not known to be harmless replaced by ``***``.

    The user name, host, path and the options in :data:`NON_SECRET_QUERY_NAMES` stay readable; a password
    with characters a URL should have escaped (``/``, ``@``) is still found.

    Example:
        >>> redact_url("amqp://guest:secret@host:5672/")
        'amqp://guest:***@host:5672/'
        >>> redact_url("azurequeue://acct.queue.core.windows.net?credential=KEY&visibility_timeout=60")
        'azurequeue://acct.queue.core.windows.net?credential=***&visibility_timeout=60'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head, qsep, tail = rest.partition("?")
    query, fsep, fragment = tail.partition("#")
    if not qsep:
        head, fsep, fragment = head.partition("#")
    if sep and "@" in head:
        userinfo, host = head.rsplit("@", 1)
        if ":" in userinfo:
            head = f"{userinfo.split(':', 1)[0]}:***@{host}"
    if query:
        query = _redact_query(query)
    if fragment:
        fragment = "***"
    return f"{scheme}{sep}{head}{qsep}{query}{fsep}{fragment}"

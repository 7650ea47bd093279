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
=====================================  ==========================================  ===================

Secrets (``signing_key`` and passwords inside URLs) are ``SecretStr`` or redacted by :func:`redact_url`
so they never show in logs, reprs or errors.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_PREFETCH",
    "Settings",
    "redact_url",
]

DEFAULT_BROKER_URL = "memory://"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_PREFETCH = 64
DEFAULT_CONCURRENCY = 16


class Settings(BaseSettings):
    """All process-wide settings; every field maps to ``TASKSTREAM_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TASKSTREAM_", frozen=True, extra="ignore")

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


def redact_url(url: str) -> str:
    """Return ``url`` with any password (and SAS-like query secrets) replaced by ``***``.

    Example:
        >>> redact_url("amqp://guest:secret@host:5672/")
        'amqp://guest:***@host:5672/'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = parts.query
    if query:
        secret_keys = ("accountkey", "sig", "password", "secret", "token", "connection_string", "key")
        pieces = []
        for piece in query.split("&"):
            name = piece.split("=", 1)[0]
            pieces.append(f"{name}=***" if name.lower() in secret_keys else piece)
        query = "&".join(pieces)
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret; urlunsplit would also turn "sqlite:////abs.db" into "sqlite://abs.db"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

"""Configuration errors at start, named by the setting that holds the bad value.

A process checks every URL it was given before it takes work (``App`` when it is built and started,
``taskstream worker|run|pipeline run`` before they run), so a typo stops it at once with one line such as
``TASKSTREAM_RESULT_STORE_URL: unknown result store URL scheme 'foo' in 'foo://x' (known: ...)`` instead of
starting and then failing every message. URLs in these messages are redacted
(:func:`~taskstream.settings.redact_url`).

Example:
    >>> from taskstream.errors import ConfigurationError
    >>> try:
    ...     with setting("TASKSTREAM_BROKER_URL"):
    ...         raise ConfigurationError("unknown broker URL scheme 'amqq'")
    ... except ConfigurationError as exc:
    ...     print(exc)
    TASKSTREAM_BROKER_URL: unknown broker URL scheme 'amqq'
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from taskstream.errors import ConfigurationError, MissingExtraError, TaskstreamError
from taskstream.settings import Settings, env_name

if TYPE_CHECKING:
    from taskstream.brokers.base import Broker
    from taskstream.payloads import ClaimCheck
    from taskstream.stream_ops.state import StateStore

__all__ = ["check_broker_url", "claim_check_from_settings", "open_state_store", "setting"]


@contextlib.contextmanager
def setting(name: str) -> Iterator[None]:
    """Re-raise a configuration problem met inside the block as a :class:`ConfigurationError` led by ``name``.

    Taskstream errors (a bad URL, a store that cannot be opened) and the ``ValueError`` of a driver's URL
    parser are caught; a missing extra keeps its own type and its ``pip install`` hint.

    Raises:
        ConfigurationError: ``"<name>: <what was wrong>"``, the original chained.
    """
    try:
        yield
    except MissingExtraError:
        raise
    except (TaskstreamError, ValueError) as exc:
        text = str(exc)
        if text.startswith(f"{name}:"):
            raise
        raise ConfigurationError(f"{name}: {text}") from exc


def check_broker_url(
    url: str | None, *, name: str = env_name("broker_url"), settings: Settings | None = None
) -> Broker:
    """Build (not connect) the broker for ``url`` (default: the settings'), failing with ``name`` in front.

    ``settings`` reach the backends that take them (SQS's redrive count follows ``max_attempts``).
    """
    from taskstream.brokers.base import broker_from_url

    settings = settings or Settings()
    with setting(name):
        return broker_from_url(url or settings.broker_url.get_secret_value(), settings=settings)


def claim_check_from_settings(settings: Settings) -> ClaimCheck:
    """The claim-check ``TASKSTREAM_PAYLOAD_STORE_URL`` and ``TASKSTREAM_PAYLOAD_THRESHOLD`` describe.

    Raises:
        ConfigurationError: led by the setting's name (bad URL, unknown scheme, bad threshold).
    """
    from taskstream.payloads import ClaimCheck

    with setting(env_name("payload_store_url")):
        return ClaimCheck.from_settings(settings)


def open_state_store(url: str | None, settings: Settings | None = None, *, name: str | None = None) -> StateStore:
    """The state store ``url`` names (default ``TASKSTREAM_STATE_URL``, else the SQLite file), checked now.

    Args:
        url: a state store URL, or ``None`` for the settings'.
        settings: where ``TASKSTREAM_STATE_URL`` is read (from the environment when omitted).
        name: what the error calls the URL's source (default: the environment variable).

    Raises:
        ConfigurationError: led by ``name``.
    """
    from taskstream.stream_ops.state import DEFAULT_STATE_URL, state_store_from_url

    settings = settings or Settings()
    configured = settings.state_url.get_secret_value() if settings.state_url is not None else None
    with setting(name or env_name("state_url")):
        return state_store_from_url(url or configured or DEFAULT_STATE_URL)

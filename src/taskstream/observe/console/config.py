"""What a console shows: the broker, the queues, the pipelines, the result store and the metrics endpoints.

:class:`ConsoleConfig` is plain frozen data; :func:`config_for` builds one from an App, Pipelines and queue
names (what ``taskstream console --app mod:app --pipeline mod:p --queue NAME`` passes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from taskstream.errors import ConfigurationError
from taskstream.settings import redact_url

__all__ = [
    "DEFAULT_DEAD_LETTER_LIMIT",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_REFRESH",
    "ConsoleConfig",
    "config_for",
]

DEFAULT_HOST = "127.0.0.1"
"""The console listens on the loopback interface unless told otherwise."""
DEFAULT_PORT = 8089
DEFAULT_REFRESH = 1.0
"""Seconds between two samples of the queues (and two refreshes of an open page)."""
DEFAULT_DEAD_LETTER_LIMIT = 50
"""Most dead letters a page lists."""


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """Everything a console needs; secrets stay in the URLs and are shown only through ``redact_url``.

    Attributes:
        broker_url: the broker to watch (a ``memory://hub`` URL only shows something inside the same process).
        queues: the queues to show, each with its dead-letter queue when it is not the broker's default name.
        pipelines: the :class:`~taskstream.stream_ops.pipeline.Pipeline` objects whose graphs to draw.
        result_store_url: where task status and results are read by id (``None``: no task page).
        metrics_urls: Prometheus endpoints (``http://host:port/metrics``) whose per-queue counters give rates.
        host: the address to listen on.
        port: the port to listen on (0 picks a free one).
        refresh: seconds between two samples.
        dead_letter_limit: most dead letters a page lists.
    """

    broker_url: str
    queues: Mapping[str, str | None]
    pipelines: tuple[Any, ...] = ()
    result_store_url: str | None = None
    metrics_urls: tuple[str, ...] = ()
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    refresh: float = DEFAULT_REFRESH
    dead_letter_limit: int = DEFAULT_DEAD_LETTER_LIMIT
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.queues:
            raise ConfigurationError("the console has no queues to show: give --app, --pipeline or --queue")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"--port must be between 0 and 65535, got {self.port}")
        if not 0.1 <= self.refresh <= 60:
            raise ConfigurationError(f"--refresh must be between 0.1 and 60 seconds, got {self.refresh}")
        if self.dead_letter_limit < 1:
            raise ConfigurationError(f"the dead-letter limit must be at least 1, got {self.dead_letter_limit}")
        if not self.host or any(c.isspace() or c in "/@?#" for c in self.host):
            raise ConfigurationError(f"--host must be an address or a host name, got {self.host!r}")
        for url in self.metrics_urls:
            if not url.lower().startswith(("http://", "https://")):
                raise ConfigurationError(f"--metrics-url must be an http(s) URL, got {redact_url(url)!r}")

    @property
    def wildcard(self) -> bool:
        """True when the console listens on every interface (``0.0.0.0``, ``::``)."""
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_unspecified
        except ValueError:
            return False

    def scrub(self, text: str) -> str:
        """``text`` with every configured URL (and its password) replaced by its redacted form."""
        for url in (self.broker_url, self.result_store_url, *self.metrics_urls, *self.secrets):
            if not url:
                continue
            text = text.replace(url, redact_url(url))
            password = _password(url)
            if password:
                text = text.replace(password, "***")
        return text


def _password(url: str) -> str | None:
    """The password of ``scheme://user:password@host``, if any."""
    _scheme, sep, rest = url.partition("://")
    head = rest.split("?", 1)[0] if sep else ""
    if "@" not in head:
        return None
    userinfo = head.rsplit("@", 1)[0]
    _user, colon, password = userinfo.partition(":")
    return password if colon and len(password) >= 3 else None


def config_for(
    broker_url: str,
    *,
    app: Any = None,
    pipelines: Iterable[Any] = (),
    queues: Iterable[str] = (),
    **options: Any,
) -> ConsoleConfig:
    """A :class:`ConsoleConfig` for an App (its queues and the pipelines added to it), Pipelines and queue names.

    Args:
        broker_url: the broker to watch.
        app: a taskstream App (or ``None``).
        pipelines: Pipelines to draw and whose stage queues to show.
        queues: more queue names to show.
        **options: the other :class:`ConsoleConfig` fields.

    Raises:
        ConfigurationError: ``app`` is not an App, a pipeline is not a Pipeline, or nothing to show.
    """
    from taskstream.app import App
    from taskstream.observe.queues import app_queues
    from taskstream.stream_ops.pipeline import Pipeline

    wanted: dict[str, str | None] = {}
    found: list[Any] = []
    if app is not None:
        if not isinstance(app, App):
            raise ConfigurationError(f"--app must name a taskstream App, got a {type(app).__name__}")
        wanted.update(app_queues(app))
        found.extend(p for c in app.components if isinstance(p := getattr(c, "pipeline", None), Pipeline))
    for pipeline in pipelines:
        if not isinstance(pipeline, Pipeline):
            raise ConfigurationError(f"--pipeline must name a taskstream Pipeline, got a {type(pipeline).__name__}")
        found.append(pipeline)
        for queue, dlq in app_queues(pipeline).items():
            wanted.setdefault(queue, dlq)
    for name in queues:
        if not name or name.strip() != name:
            raise ConfigurationError(f"--queue must be a queue name, got {name!r}")
        wanted.setdefault(name, None)
    unique = list({p.name: p for p in found}.values())
    return ConsoleConfig(broker_url=broker_url, queues=wanted, pipelines=tuple(unique), **options)

"""What every request handler of the console shares: the config, the sampler, the brokers, the templates."""

from __future__ import annotations

import asyncio
import datetime
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import jinja2
from aiohttp import web

from taskstream.brokers.base import Broker
from taskstream.observe.console.config import ConsoleConfig
from taskstream.observe.console.graph import PipelineView
from taskstream.observe.console.sampler import Sampler
from taskstream.settings import redact_url
from taskstream.tasks.stores.base import ResultStore

__all__ = ["STATE", "ConsoleState", "template_environment"]

RECENT_TASKS = 20


@dataclass(slots=True)
class ConsoleState:
    """The running console.

    Attributes:
        config: what it shows.
        sampler: the queues' figures, sampled on their own broker connection.
        actions: the broker connection that lists, replays and purges dead letters.
        lock: held while dead letters are read or moved, and while the sampler reads (a held dead letter is
            not counted in its queue's depth, so the two never overlap).
        store: the result store, or ``None``.
        store_error: why there is no result store.
        pipelines: by name.
        templates: the page templates.
        recent_tasks: task ids looked up lately, newest first.
        flash: one message per queue for the next page (what a replay or purge did).
    """

    config: ConsoleConfig
    sampler: Sampler
    actions: Broker
    lock: asyncio.Lock
    store: ResultStore | None
    store_error: str | None
    pipelines: dict[str, PipelineView]
    templates: jinja2.Environment
    recent_tasks: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_TASKS))
    flash: dict[str, str] = field(default_factory=dict)

    def render(self, name: str, *, title: str, **context: Any) -> web.Response:
        """The page ``name`` as an HTML response."""
        html = self.templates.get_template(name).render(
            title=title,
            broker=redact_url(self.config.broker_url),
            refresh_ms=int(self.config.refresh * 1000),
            pipeline_names=list(self.pipelines),
            has_store=self.store is not None,
            **context,
        )
        return web.Response(text=html, content_type="text/html")

    def remember_task(self, task_id: str) -> None:
        if task_id in self.recent_tasks:
            self.recent_tasks.remove(task_id)
        self.recent_tasks.appendleft(task_id)


STATE = web.AppKey("taskstream_console", ConsoleState)


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.1f}"
    return str(int(value))


def _rate(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}/s" if signed else f"{value:.1f}/s"


def _when(value: Any) -> str:
    if value is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(float(value)).astimezone()
    return moment.isoformat(sep=" ", timespec="milliseconds")


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def template_environment() -> jinja2.Environment:
    """The console's templates (package data), autoescaped, with its number and time filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("taskstream.observe.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(number=_number, rate=_rate, when=_when, seconds=_seconds)
    return env

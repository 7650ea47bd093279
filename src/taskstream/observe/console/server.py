"""The console's web server: aiohttp.web, bound to 127.0.0.1 unless told otherwise.

Two guards make its buttons safe enough for a tool on a developer's machine or behind an SSH tunnel:

* **Host check**: a request whose ``Host`` is not the console's own address (``127.0.0.1``, ``localhost``,
  ``::1`` or ``--host``) is refused, so a web page cannot reach it by DNS rebinding. Listening on every
  interface (``--host 0.0.0.0``) turns this check off: the operator chose who may connect.
* **Same origin for changes**: a ``POST`` (replay, purge) must carry an ``Origin`` (or ``Referer``) of the
  console itself and, when the browser sends it, ``Sec-Fetch-Site: same-origin``; pages cannot be framed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from yarl import URL

from taskstream.brokers.base import Broker, broker_from_url
from taskstream.config_check import setting
from taskstream.errors import ConfigurationError
from taskstream.observe.console.config import ConsoleConfig
from taskstream.observe.console.graph import PipelineView
from taskstream.observe.console.sampler import Sampler
from taskstream.observe.console.state import STATE, ConsoleState, template_environment
from taskstream.observe.console.views import routes
from taskstream.settings import env_name, redact_url
from taskstream.tasks.stores.base import ResultStore, result_store_from_url

__all__ = ["build_console", "run_console"]

log = logging.getLogger("taskstream.observe.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _make_broker(url: str) -> Broker:
    """A broker for ``url``; SQS gets 1 s long polls unless the URL says otherwise (as ``taskstream dlq``)."""
    options: dict[str, Any] = {"wait_time": 1} if url.lower().startswith("sqs://") and "wait_time=" not in url else {}
    with setting("--broker"):
        return broker_from_url(url, **options)


def _open_store(config: ConsoleConfig) -> tuple[ResultStore | None, str | None]:
    if config.result_store_url is None:
        return None, (
            f"No result store: start the console with --result-store URL (or set {env_name('result_store_url')}) "
            "to look tasks up by id."
        )
    with setting("--result-store"):
        return result_store_from_url(config.result_store_url), None


def _allowed_host(config: ConsoleConfig, request: web.Request) -> bool:
    if config.wildcard:
        return True
    host = (request.url.host or "").strip("[]").lower()
    return host in LOOPBACK_NAMES or host == config.host.strip("[]").lower()


def _same_origin(request: web.Request) -> str | None:
    """Why ``request`` may not change anything, or ``None`` when it comes from the console's own pages."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site != "same-origin":
        return f"Sec-Fetch-Site is {fetch_site!r}"
    claimed = request.headers.get("Origin")
    if not claimed or claimed == "null":
        claimed = request.headers.get("Referer")
    if not claimed:
        return "no Origin or Referer header"
    try:
        origin = URL(claimed).origin()
    except ValueError:
        return "an unreadable Origin"
    if origin != request.url.origin():
        return f"origin {str(origin)!r} is not the console's {str(request.url.origin())!r}"
    return None


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[STATE].config
    if not _allowed_host(config, request):
        raise web.HTTPMisdirectedRequest(text=f"this console does not answer for host {request.host!r}")
    if request.method not in SAFE_METHODS:
        why = _same_origin(request)
        if why is not None:
            raise web.HTTPForbidden(text=f"refused a cross-origin {request.method}: {why}")
    response = await handler(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.sampler.broker.connect()
    try:
        await state.actions.connect()
        try:
            await state.sampler.sample_once()
            task = asyncio.create_task(state.sampler.run(), name="taskstream-console-sampler")
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await state.actions.close()
    finally:
        await state.sampler.broker.close()
        if state.store is not None:
            await state.store.close()


def build_console(config: ConsoleConfig) -> web.Application:
    """The console as an :class:`aiohttp.web.Application`; its brokers connect when the application starts.

    Raises:
        ConfigurationError: a bad broker or result store URL, named by its option.
        MissingExtraError: the broker's extra is not installed.
    """
    lock = asyncio.Lock()
    sampler = Sampler(
        _make_broker(config.broker_url),
        config.queues,
        metrics_urls=config.metrics_urls,
        refresh=config.refresh,
        scrub=config.scrub,
        lock=lock,
    )
    store, store_error = _open_store(config)
    state = ConsoleState(
        config=config,
        sampler=sampler,
        actions=_make_broker(config.broker_url),
        lock=lock,
        store=store,
        store_error=store_error,
        pipelines={p.name: PipelineView.of(p) for p in config.pipelines},
        templates=template_environment(),
    )
    app = web.Application(middlewares=[_guard])
    app[STATE] = state
    app.add_routes(routes)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def run_console(config: ConsoleConfig, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve the console until SIGINT or SIGTERM (or cancellation).

    Args:
        config: what to show and where to listen.
        ready: called with the console's URL once it listens (``--port 0`` picks a free port).

    Raises:
        ConfigurationError: the address cannot be listened on, or a bad URL.
    """
    runner = web.AppRunner(build_console(config), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigurationError(f"--host/--port: cannot listen on {config.host}:{config.port}: {exc}") from exc
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/"
        log.info("taskstream console on %s (broker %s)", url, redact_url(config.broker_url))
        if ready is not None:
            ready(url)
        await _wait_for_signal()
    finally:
        await runner.cleanup()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

"""The HTTP health, readiness and metrics server of a running App or pipeline stage (aiohttp.web).

=============  =====================================================================================
Path           Answer
=============  =====================================================================================
``/healthz``   ``200`` while the process's event loop runs (liveness: restart the process if not).
``/readyz``    ``200`` when the app is started and every consumer it runs is consuming; ``503`` otherwise
               (before start, while stopping, after a consumer stopped on a broker failure).
``/metrics``   Prometheus' text format from the app's registry (:mod:`taskstream.observe.metrics`);
               ``404`` while metrics are off.
=============  =====================================================================================

Both answer a small JSON document; ``/readyz`` lists each consumer's queue, state and counters, so
``curl host:port/readyz`` doubles as a progress view. ``GET`` and ``HEAD`` are served; anything else is ``405``.

Readiness reads the app only through public state: ``app.consumers`` (filled once the broker is connected and the
consumers started, emptied on stop) with each consumer's ``running`` and ``stats``; components attached with
``app.add_component`` take part when they expose ``consumers`` (a list or a mapping of the same shape, on
themselves or on their ``worker``, as the task runtime does) or a boolean ``ready``; a broker
that exposes a boolean ``connected`` must say ``True``.

The CLI turns it on with ``--health-port`` (or ``TASKSTREAM_HEALTH_PORT``) on ``taskstream run``,
``taskstream worker`` and ``taskstream pipeline run`` (which also turns metrics on);
``TASKSTREAM_HEALTH_HOST`` picks the address (all interfaces by default, as containers and Kubernetes probes
need). It needs aiohttp (``pip install 'taskstream[metrics]'``).

Example:
    >>> async def example(app):
    ...     async with HealthServer(app, port=8080):
    ...         await app.serve()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import orjson

from taskstream.errors import ConfigurationError

if TYPE_CHECKING:
    from taskstream.app import App
    from taskstream.brokers.base import Broker

__all__ = [
    "DEFAULT_HEALTH_HOST",
    "HEALTH_ENV_VARS",
    "HealthServer",
    "Readiness",
    "app_readiness",
    "run_with_health",
    "serve_with_health",
]

log = logging.getLogger("taskstream.health")

T = TypeVar("T")

DEFAULT_HEALTH_HOST = "0.0.0.0"  # probes come from outside the container or the pod

HEALTH_ENV_VARS = {
    "TASKSTREAM_HEALTH_PORT": (
        "port of the health and metrics server of `taskstream run`, `worker`, `pipeline run` (off when unset)"
    ),
    "TASKSTREAM_HEALTH_HOST": f"address the health server binds ({DEFAULT_HEALTH_HOST} by default)",
}


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of one readiness check.

    Attributes:
        ready: the app is started and every consumer is consuming.
        reason: why not (empty when ready).
        consumers: one JSON-ready dict per consumer (queue, running, counters).
    """

    ready: bool
    reason: str = ""
    consumers: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The JSON body ``/readyz`` answers."""
        body: dict[str, Any] = {"status": "ready" if self.ready else "not ready", "consumers": self.consumers}
        if self.reason:
            body["reason"] = self.reason
        return body


def _consumer_view(consumer: Any) -> dict[str, Any]:
    stats = getattr(consumer, "stats", None)
    view: dict[str, Any] = {
        "queue": str(getattr(consumer, "queue", "?")),
        "running": bool(getattr(consumer, "running", False)),
    }
    for name in ("received", "acked", "retried", "dead_lettered", "in_flight", "last_error"):
        if stats is not None and hasattr(stats, name):
            view[name] = getattr(stats, name)
    return view


def _component_consumers(component: Any) -> list[Any]:
    """A component's consumers: its ``consumers`` (list or mapping), or its ``worker``'s (task workers)."""
    found = getattr(component, "consumers", None)
    if found is None:
        found = getattr(getattr(component, "worker", None), "consumers", None)
    if isinstance(found, Mapping):
        return list(found.values())
    return list(found or ())


def app_readiness(app: App) -> Readiness:
    """Check ``app`` through its public state (see the module docstring).

    Args:
        app: a taskstream App, started or not.

    Returns:
        The readiness, with one entry per consumer of the app and of its components.
    """
    consumers: list[Any] = list(app.consumers)
    reasons: list[str] = []
    for component in app.components:
        consumers.extend(_component_consumers(component))
        flag = getattr(component, "ready", None)
        if isinstance(flag, bool) and not flag:
            reasons.append(f"component {type(component).__name__} is not ready")
    connected = getattr(app.broker, "connected", None)
    if isinstance(connected, bool) and not connected:
        reasons.append("the broker is not connected")
    views = [_consumer_view(c) for c in consumers]
    if not views:
        reasons.insert(0, "no consumer is running (the app is not started yet, or it is stopping)")
    stopped = [v["queue"] for v in views if not v["running"]]
    if stopped:
        reasons.append("stopped consumer(s): " + ", ".join(stopped))
    return Readiness(ready=not reasons, reason="; ".join(reasons), consumers=views)


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` from the running event loop (aiohttp).

    Args:
        app: the app whose readiness ``/readyz`` reports (and whose metrics ``/metrics`` serves); ``None`` with
            ``check`` given.
        port: TCP port; ``0`` picks a free one (read it back from :attr:`port`).
        host: address to bind.
        check: a custom readiness check instead of :func:`app_readiness`.
        registry: the ``prometheus_client`` registry ``/metrics`` serves; default the app's when its metrics are
            on. Without one, ``/metrics`` answers ``404`` saying metrics are off.
    """

    def __init__(
        self,
        app: App | None = None,
        *,
        port: int,
        host: str = DEFAULT_HEALTH_HOST,
        check: Callable[[], Readiness] | None = None,
        registry: Any = None,
    ) -> None:
        if app is None and check is None:
            raise ValueError("HealthServer needs an app or a readiness check")
        if not 0 <= port <= 65535:
            raise ValueError(f"health port must be between 0 and 65535, got {port}")
        self._app = app
        self._custom_check = check
        self.host = host
        self._requested_port = port
        if registry is None and app is not None and app.metrics.enabled:
            registry = app.metrics.registry
        self.registry = registry
        self._runner: Any = None
        self._bound: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one, or the one picked for ``0``)."""
        return self._bound if self._bound is not None else self._requested_port

    async def start(self) -> None:
        """Bind and start answering. Idempotent.

        Raises:
            ConfigurationError: aiohttp is not installed (``pip install 'taskstream[metrics]'``).
        """
        if self._runner is not None:
            return
        try:
            from aiohttp import web
        except ModuleNotFoundError:
            raise ConfigurationError(
                "the health server (--health-port) needs aiohttp: pip install 'taskstream[metrics]'"
            ) from None
        server = web.Application()
        server.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(server, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound = int(runner.addresses[0][1])
        log.info("health server on http://%s:%d (/healthz, /readyz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        """Stop answering and close open connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), timeout=2.0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def readiness(self) -> Readiness:
        """Run the readiness check now."""
        if self._custom_check is not None:
            return self._custom_check()
        assert self._app is not None
        return app_readiness(self._app)

    def answer(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for one request to ``/healthz`` or ``/readyz`` (the routing, apart from
        the socket work; ``/metrics`` is answered in Prometheus' text format instead)."""
        path = path.split("?", 1)[0]
        if path not in ("/healthz", "/readyz", "/metrics"):
            return 404, {"error": f"no such path {path!r}; try /healthz, /readyz or /metrics"}
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"{method} is not allowed; use GET or HEAD"}
        if path == "/healthz":
            return 200, {"status": "ok"}
        if path == "/metrics":
            return 404, {"error": "metrics are off (App(metrics=True), or --health-port on the CLI)"}
        try:
            readiness = self.readiness()
        except Exception as exc:  # a broken check means "not ready", never a crashed server
            log.warning("readiness check failed: %s: %s", type(exc).__name__, exc)
            return 503, {"status": "not ready", "reason": f"readiness check failed: {type(exc).__name__}"}
        return (200 if readiness.ready else 503), readiness.as_json()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        method = request.method.upper()
        if request.path == "/metrics" and method in ("GET", "HEAD") and self.registry is not None:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            response = web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
        else:
            status, body = self.answer(method, request.path)
            response = web.Response(
                body=orjson.dumps(body) + b"\n",
                status=status,
                headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
            )
        response.force_close()  # probes open one connection per request
        return response


async def run_with_health(
    work: Awaitable[T], *, port: int, host: str = DEFAULT_HEALTH_HOST, broker: Broker, name: str
) -> T:
    """Run ``work`` (a pipeline stage, say) with health, readiness and metrics served, metrics on for ``broker``.

    ``/readyz`` says ready while ``work`` runs; ``/metrics`` serves the recorder attached to ``broker`` (one is
    made and attached when there is none), whose queue depths are polled meanwhile.
    """
    from taskstream.observe.metrics import attach, recorder_for, resolve

    recorder = recorder_for(broker)
    if not recorder.enabled:
        recorder = resolve(True)
        attach(broker, recorder)
    task = asyncio.ensure_future(work)

    def check() -> Readiness:
        if task.done():
            return Readiness(ready=False, reason=f"{name} has finished")
        return Readiness(ready=True)

    poller = asyncio.create_task(recorder.poll_depths(broker), name="taskstream:depths")
    try:
        async with HealthServer(port=port, host=host, check=check, registry=recorder.registry):
            return await task
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


async def serve_with_health(app: App, port: int, host: str = DEFAULT_HEALTH_HOST) -> None:
    """Answer health probes while ``app.serve()`` runs: liveness from the start, readiness once consuming."""
    async with HealthServer(app, port=port, host=host):
        await app.serve()

"""Running a queue device and a forwarder: on their own thread (:class:`DeviceThread`) or until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, Self

from taskstream.brokers.zeromq.config import DeviceConfig, endpoint_url
from taskstream.brokers.zeromq.device import ZmqDevice
from taskstream.brokers.zeromq.forwarder import Forwarder
from taskstream.errors import BrokerConnectionError

__all__ = ["DeviceThread", "run_device"]


class DeviceThread:
    """A :class:`ZmqDevice` (and optionally a :class:`Forwarder`) on its own event loop in a daemon thread.

    For synchronous code, tests and benchmarks that need a device that outlives one event loop.

    Example:
        >>> device = DeviceThread(["tcp://127.0.0.1:*"]).start()
        >>> url = device.url  # 'zmq://127.0.0.1:40123'
        >>> device.stop()
    """

    def __init__(
        self,
        bind: Sequence[str] | str = ("tcp://127.0.0.1:*",),
        *,
        pubsub: tuple[str, str] | None = None,
        config: DeviceConfig | None = None,
    ) -> None:
        self.device = ZmqDevice(bind, config) if bind else None
        self.forwarder = Forwarder(*pubsub) if pubsub else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """The ``zmq://`` URL of the device's first endpoint."""
        assert self.device is not None and self.device.endpoints, "start() first"
        return endpoint_url(self.device.endpoints[0])

    def start(self, timeout: float = 10.0) -> Self:
        """Start the thread and wait until everything is bound; bind errors are raised here."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                if self.device is not None:
                    await self.device.start()
                if self.forwarder is not None:
                    await self.forwarder.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                if self.device is not None:
                    await self.device.stop()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                if self.forwarder is not None:
                    await self.forwarder.stop()
                if self.device is not None:
                    await self.device.stop()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="zmq-device", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise BrokerConnectionError(f"the zmq device thread did not start within {timeout} s")
        if failure:
            raise failure[0]
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the device's loop and return its result (e.g. ``lambda: device.snapshot()``)."""
        assert self._loop is not None, "start() first"

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the device (messages it holds are dropped) and join the thread."""
        if self._loop is None or self._stop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._loop = None


async def run_device(
    bind: Sequence[str],
    *,
    pubsub: tuple[str, str] | None = None,
    config: DeviceConfig | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[ZmqDevice | None, Forwarder | None], None] | None = None,
) -> None:
    """Serve a device and/or a forwarder until ``stop`` is set, or SIGINT/SIGTERM when ``stop`` is None."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    device = ZmqDevice(bind, config) if bind else None
    forwarder = Forwarder(*pubsub) if pubsub else None
    try:
        if device is not None:
            await device.start()
        if forwarder is not None:
            await forwarder.start()
        if on_ready is not None:
            on_ready(device, forwarder)
        await stop.wait()
    finally:
        if forwarder is not None:
            await forwarder.stop()
        if device is not None:
            await device.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)

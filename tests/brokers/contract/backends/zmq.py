"""The ZeroMQ backend in the contract suite, against a queue device started in this process.

The device runs on its own thread and event loop for the whole test session (each test has its own loop;
the device must outlive them all), bound to a free TCP port on 127.0.0.1.
"""

from __future__ import annotations

import atexit
import threading

from taskstream.brokers.base import Broker
from taskstream.brokers.zeromq import DeviceThread, ZeroMQBroker, ZeroMQConfig
from tests.brokers.contract.backends import BackendSpec

_lock = threading.Lock()
_device: DeviceThread | None = None


def device() -> DeviceThread:
    """The session's device, started on first use."""
    global _device
    with _lock:
        if _device is None:
            _device = DeviceThread(["tcp://127.0.0.1:*"]).start()
            atexit.register(_device.stop)
        return _device


async def setup() -> None:
    device()


def make(visibility_timeout: float | None = None) -> Broker:
    # visibility_timeout does not apply: the device holds messages until ack, close or missed heartbeats
    endpoint = device().device
    assert endpoint is not None
    return ZeroMQBroker(endpoint.endpoints[0], ZeroMQConfig(max_message_bytes=1024 * 1024))


def url(visibility_timeout: float | None = None) -> str:
    """The session's device as a ``zmq://`` URL, for another process."""
    endpoint = device().device
    assert endpoint is not None
    return endpoint.endpoints[0].replace("tcp://", "zmq://")


SPEC = BackendSpec(name="zmq", make=make, setup=setup, url=url)

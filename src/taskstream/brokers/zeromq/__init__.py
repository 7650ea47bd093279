"""ZeroMQ backend: work queues with acks through taskstream's queue device, topic pub/sub through a forwarder.

ZeroMQ has no broker, so taskstream brings one (``taskstream zmq-device``). Not durable: messages held by the
device are lost if it dies; while it runs, delivery is at-least-once. ``docs/brokers.md`` maps each operation
onto the device and lists the URL options. Modules: ``client`` (:class:`ZeroMQBroker`), ``topics``, ``device``,
``state``, ``forwarder``, ``protocol`` (the wire), ``config``, ``runner`` and ``cli`` (the verb).

Names are imported on first use, so the ``zmq-device`` verb and :func:`endpoint_from_url` work without pyzmq;
anything that needs it raises :class:`~taskstream.errors.MissingExtraError` naming the ``pip install``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from taskstream.errors import MissingExtraError

if TYPE_CHECKING:
    from taskstream.brokers.zeromq.cli import register
    from taskstream.brokers.zeromq.client import ZeroMQBroker
    from taskstream.brokers.zeromq.config import (
        DEFAULT_HEARTBEAT_INTERVAL,
        DEFAULT_HEARTBEAT_LIVENESS,
        DEFAULT_HWM,
        DEFAULT_PUBSUB_HWM,
        DEFAULT_REQUEST_TIMEOUT,
        ZEROMQ_MAX_MESSAGE_BYTES,
        DeviceConfig,
        ZeroMQConfig,
        check_endpoint,
        endpoint_from_url,
        endpoint_url,
        require_zmq,
    )
    from taskstream.brokers.zeromq.device import ZmqDevice
    from taskstream.brokers.zeromq.forwarder import Forwarder, ForwarderStats
    from taskstream.brokers.zeromq.protocol import PROTOCOL_VERSION
    from taskstream.brokers.zeromq.runner import DeviceThread, run_device
    from taskstream.brokers.zeromq.state import DeviceStats
    from taskstream.brokers.zeromq.topics import DEFAULT_MAX_STREAMS, TopicMessage, TopicPublisher, TopicSubscriber

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_LIVENESS",
    "DEFAULT_HWM",
    "ZEROMQ_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_PUBSUB_HWM",
    "DEFAULT_REQUEST_TIMEOUT",
    "DeviceConfig",
    "DeviceStats",
    "DeviceThread",
    "Forwarder",
    "ForwarderStats",
    "PROTOCOL_VERSION",
    "TopicMessage",
    "TopicPublisher",
    "TopicSubscriber",
    "ZeroMQBroker",
    "ZeroMQConfig",
    "ZmqDevice",
    "check_endpoint",
    "endpoint_from_url",
    "endpoint_url",
    "register",
    "require_zmq",
    "run_device",
]

# public name -> the submodule that defines it
_WHERE = {
    **dict.fromkeys(
        [
            "DEFAULT_HEARTBEAT_INTERVAL",
            "DEFAULT_HEARTBEAT_LIVENESS",
            "DEFAULT_HWM",
            "ZEROMQ_MAX_MESSAGE_BYTES",
            "DEFAULT_PUBSUB_HWM",
            "DEFAULT_REQUEST_TIMEOUT",
            "DeviceConfig",
            "ZeroMQConfig",
            "check_endpoint",
            "endpoint_from_url",
            "endpoint_url",
            "require_zmq",
        ],
        "config",
    ),
    **dict.fromkeys(["DEFAULT_MAX_STREAMS", "TopicMessage", "TopicPublisher", "TopicSubscriber"], "topics"),
    **dict.fromkeys(["DeviceThread", "run_device"], "runner"),
    **dict.fromkeys(["Forwarder", "ForwarderStats"], "forwarder"),
    "DeviceStats": "state",
    "PROTOCOL_VERSION": "protocol",
    "ZeroMQBroker": "client",
    "ZmqDevice": "device",
    "register": "cli",
}


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first use (see the module docstring for why)."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{where}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "zmq":
            raise MissingExtraError("zmq", "zmq", "pyzmq") from exc
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

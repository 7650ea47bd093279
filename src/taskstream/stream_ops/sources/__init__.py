"""Sources: simulated instruments, iterables, JSON Lines files, HTTP polling, ZeroMQ SUB, taskstream queues."""

from taskstream.stream_ops.sources.base import STOP_BODY, Source, SourceBatch, is_stop
from taskstream.stream_ops.sources.files import JsonLinesSource
from taskstream.stream_ops.sources.http import HttpPollSource
from taskstream.stream_ops.sources.instruments import CameraSource, SimulatedCamera, SimulatedSensor
from taskstream.stream_ops.sources.iterables import AsyncIterableSource, IterableSource, as_source
from taskstream.stream_ops.sources.queues import QueueSource
from taskstream.stream_ops.sources.zmq import ZmqSubSource

__all__ = [
    "STOP_BODY",
    "AsyncIterableSource",
    "CameraSource",
    "HttpPollSource",
    "IterableSource",
    "JsonLinesSource",
    "QueueSource",
    "SimulatedCamera",
    "SimulatedSensor",
    "Source",
    "SourceBatch",
    "ZmqSubSource",
    "as_source",
    "is_stop",
]

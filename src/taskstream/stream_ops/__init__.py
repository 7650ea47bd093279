"""Stream pipelines: sources -> operators -> windows -> sinks, run fused or stage by stage over queues.

Example:
    >>> from taskstream.stream_ops import Pipeline, SimulatedSensor, TumblingWindow, EventClock
    >>> from taskstream.stream_ops import Count, Mean
    >>> p = Pipeline("doc-sensors")
    >>> windows = (
    ...     p.source("sensor", SimulatedSensor(2, rate=10, count=40, start=0.0, late=0, bad=0))
    ...     .key_by(lambda r: r["sensor"])
    ...     .window(TumblingWindow(1.0), EventClock("t", allowed_lateness=0.5))
    ...     .aggregate(n=Count(), mean=Mean("value"))
    ... )
    >>> results = windows.collect()
    >>> _ = p.run_sync()
    >>> sorted(r[1]["n"] for r in results)
    [5, 5, 5, 5, 5, 5, 5, 5]

The model: :mod:`~taskstream.stream_ops.core` (primitives), :mod:`~taskstream.stream_ops.plan` (stages and
queues), :mod:`~taskstream.stream_ops.runner` (acks, snapshots, end-of-stream) and
:mod:`~taskstream.stream_ops.windows` (clock, windowers and logic: event time, watermarks, lateness).
"""

from taskstream.stream_ops.aggregators import Aggregator, Collect, Count, Max, Mean, Min, Reduce, Sum
from taskstream.stream_ops.pipeline import Pipeline, PipelineComponent, StageSpec
from taskstream.stream_ops.plan import Plan, StagePlan
from taskstream.stream_ops.runner import RunConfig, RunResult
from taskstream.stream_ops.sinks import (
    CallbackSink,
    JsonLinesSink,
    ListSink,
    QueueSink,
    Sink,
    SinkWriter,
    SQLiteSink,
    StdoutSink,
)
from taskstream.stream_ops.sources import (
    AsyncIterableSource,
    CameraSource,
    HttpPollSource,
    IterableSource,
    JsonLinesSource,
    QueueSource,
    SimulatedCamera,
    SimulatedSensor,
    Source,
    SourceBatch,
    ZmqSubSource,
)
from taskstream.stream_ops.state import (
    MemoryStateStore,
    RedisStateStore,
    SQLiteStateStore,
    StateStore,
    state_store_from_url,
)
from taskstream.stream_ops.stateful import KeyedLogic
from taskstream.stream_ops.stream import BranchOut, Stream, WindowOut
from taskstream.stream_ops.windows.clock import Clock, EventClock, ManualTime, SystemClock
from taskstream.stream_ops.windows.windowers import SessionWindow, SlidingWindow, TumblingWindow, Windower
from taskstream.stream_ops.wire import Stop, send_stop

__all__ = [
    "Aggregator",
    "AsyncIterableSource",
    "BranchOut",
    "CallbackSink",
    "CameraSource",
    "Clock",
    "Collect",
    "Count",
    "EventClock",
    "HttpPollSource",
    "IterableSource",
    "JsonLinesSink",
    "JsonLinesSource",
    "KeyedLogic",
    "ListSink",
    "ManualTime",
    "Max",
    "Mean",
    "MemoryStateStore",
    "Min",
    "Pipeline",
    "PipelineComponent",
    "Plan",
    "QueueSink",
    "QueueSource",
    "Reduce",
    "RedisStateStore",
    "RunConfig",
    "RunResult",
    "SQLiteSink",
    "SQLiteStateStore",
    "SessionWindow",
    "SimulatedCamera",
    "SimulatedSensor",
    "Sink",
    "SinkWriter",
    "SlidingWindow",
    "Source",
    "SourceBatch",
    "StagePlan",
    "StageSpec",
    "StateStore",
    "StdoutSink",
    "Stop",
    "Stream",
    "Sum",
    "SystemClock",
    "TumblingWindow",
    "WindowOut",
    "Windower",
    "ZmqSubSource",
    "send_stop",
    "state_store_from_url",
]

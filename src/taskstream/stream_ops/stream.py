"""The fluent ``Stream`` API: operators as methods, each a thin call into its family module."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from taskstream.errors import ConfigurationError
from taskstream.stream_ops import batching, stateless
from taskstream.stream_ops.core import (
    BatchOp,
    BranchNode,
    MergeNode,
    OpNode,
    SinkNode,
    StageNode,
    StatefulNode,
    check_name,
    is_async_callable,
)
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.stateful import KeyedLogic

if TYPE_CHECKING:
    from taskstream.stream_ops.pipeline import Pipeline
    from taskstream.stream_ops.sinks import Sink
    from taskstream.stream_ops.windows.clock import Clock
    from taskstream.stream_ops.windows.operator import WindowedStream
    from taskstream.stream_ops.windows.windowers import Windower

__all__ = ["BranchOut", "Stream", "WindowOut"]


class Stream:
    """A stream of items leaving one step of a pipeline.

    Attributes:
        pipeline: the pipeline it belongs to.
        node_id: the step it leaves.
        port: which output of that step (``down``; ``late`` for late records; ``true``/``false`` of a branch).
        keyed: ``True`` when items are ``(key, value)`` tuples, ``False`` when known not to be, ``None`` unknown.
    """

    def __init__(self, pipeline: Pipeline, node_id: str, port: str = "down", keyed: bool | None = False) -> None:
        self.pipeline = pipeline
        self.node_id = node_id
        self.port = port
        self.keyed = keyed

    def __repr__(self) -> str:
        return f"<Stream {self.pipeline.name}:{self.node_id}.{self.port}>"

    @property
    def _edge(self) -> tuple[str, str]:
        return (self.node_id, self.port)

    def require_keyed(self, what: str) -> None:
        """Raise when this stream is known to carry unkeyed items."""
        if self.keyed is False:
            raise ConfigurationError(
                f"{what}() needs a keyed stream of (key, value) tuples, but {self!r} is not keyed: "
                "call key_by(...) first"
            )

    # -- core primitives ------------------------------------------------------------------------------

    def flat_map_batch(
        self,
        fn: Callable[[list[Any]], list[Any] | Awaitable[list[Any]]] | None = None,
        *,
        name: str | None = None,
        build: Callable[[RuntimeContext], BatchOp] | None = None,
        label: str = "flat_map_batch",
        keyed: bool | None = None,
    ) -> Stream:
        """The stateless primitive: ``fn(list_of_items) -> list_of_items`` (sync or async)."""
        if build is None:
            if fn is None:
                raise ConfigurationError("flat_map_batch() needs a function")
            op = BatchOp(fn, None, is_async=is_async_callable(fn))
            build = lambda ctx: op  # noqa: E731
        graph = self.pipeline.graph
        node = OpNode(graph.new_id(label, name), [self._edge], build=build, label=label)
        graph.add(node)
        return Stream(self.pipeline, node.id, keyed=keyed)

    def _op(self, op: BatchOp, label: str, name: str | None, keyed: bool | None) -> Stream:
        return self.flat_map_batch(name=name, build=lambda ctx: op, label=label, keyed=keyed)

    def branch(self, predicate: Callable[[Any], Any], *, name: str | None = None) -> BranchOut:
        """Split in two: items for which ``predicate`` is true, and the others."""
        graph = self.pipeline.graph
        node = BranchNode(graph.new_id("branch", name), [self._edge], ports=("true", "false"), predicate=predicate)
        graph.add(node)
        return BranchOut(
            Stream(self.pipeline, node.id, "true", self.keyed), Stream(self.pipeline, node.id, "false", self.keyed)
        )

    def merge(self, *others: Stream, name: str | None = None) -> Stream:
        """One stream with the items of this and ``others`` (in no particular order across streams)."""
        for other in others:
            if other.pipeline is not self.pipeline:
                raise ConfigurationError("merge() needs streams of the same pipeline")
        graph = self.pipeline.graph
        node = MergeNode(graph.new_id("merge", name), [self._edge, *(o._edge for o in others)])
        graph.add(node)
        keyed = self.keyed if all(o.keyed == self.keyed for o in others) else None
        return Stream(self.pipeline, node.id, keyed=keyed)

    def stateful(
        self,
        builder: Callable[[RuntimeContext], Callable[[str, Any], KeyedLogic]],
        *,
        name: str | None = None,
        stage: str | None = None,
        ports: Sequence[str] = ("down",),
        uses_timers: bool = False,
        label: str = "stateful",
        extra_inputs: Sequence[Stream] = (),
    ) -> Stream:
        """The stateful primitive: per-key :class:`KeyedLogic`; starts its own stage. Returns port ``down``.

        Other ports are reached with :meth:`side`.
        """
        self.require_keyed(label)
        graph = self.pipeline.graph
        node = StatefulNode(
            graph.new_id(label, name),
            [self._edge, *(s._edge for s in extra_inputs)],
            ports=tuple(ports),
            stage=check_name("stage", stage) if stage else None,
            builder=builder,
            label=label,
            uses_timers=uses_timers,
            keyed_input=self.keyed is True and all(s.keyed is True for s in extra_inputs),
        )
        graph.add(node)
        return Stream(self.pipeline, node.id, "down", keyed=True)

    def stateful_window(
        self,
        builder: Callable[[RuntimeContext], Callable[[str, Any], KeyedLogic]],
        *,
        label: str,
        name: str | None,
        stage: str | None,
        uses_timers: bool,
        extra_inputs: Sequence[Stream] = (),
    ) -> WindowOut:
        down = self.stateful(
            builder,
            name=name,
            stage=stage,
            ports=("down", "late"),
            uses_timers=uses_timers,
            label=label,
            extra_inputs=extra_inputs,
        )
        return WindowOut(self.pipeline, down.node_id, late=down.side("late"))

    def side(self, port: str) -> Stream:
        """Another output of the same step (``late`` of a window, ``false`` of a branch)."""
        node = self.pipeline.graph.nodes[self.node_id]
        if port not in node.ports:
            raise ConfigurationError(f"step {self.node_id!r} has no output {port!r} (it has {list(node.ports)})")
        return Stream(self.pipeline, self.node_id, port, keyed=self.keyed)

    def sink(self, sink: Sink, *, name: str | None = None) -> None:
        """Write every item to ``sink``."""
        from taskstream.stream_ops.sinks import Sink

        if not isinstance(sink, Sink):
            raise ConfigurationError(f"sink() needs a Sink (JsonLinesSink, SQLiteSink, ...), got {sink!r}")
        graph = self.pipeline.graph
        graph.add(SinkNode(graph.new_id(f"sink-{sink.label}", name), [self._edge], ports=(), sink=sink))

    def stage(self, name: str) -> Stream:
        """Start a new stage here: the following steps run as their own consumer (configure it with
        ``pipeline.stage(name)``)."""
        graph = self.pipeline.graph
        node = StageNode(graph.new_id(f"to-{check_name('stage', name)}", None), [self._edge], stage=name)
        graph.add(node)
        return Stream(self.pipeline, node.id, keyed=self.keyed)

    # -- stateless operators --------------------------------------------------------------------------

    def map(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """``fn(item)`` for each item (sync or async)."""
        return self._op(stateless.map_op(fn), "map", name, None)

    def map_value(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """``(key, fn(value))`` for each keyed item."""
        self.require_keyed("map_value")
        return self._op(stateless.map_value_op(fn), "map_value", name, True)

    def filter(self, predicate: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """Keep items for which ``predicate(item)`` is true."""
        return self._op(stateless.filter_op(predicate), "filter", name, self.keyed)

    def flat_map(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """Each item becomes the items of the iterable ``fn(item)``."""
        return self._op(stateless.flat_map_op(fn), "flat_map", name, None)

    def key_by(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """``(str(fn(item)), item)``: a keyed stream, ready for windows and for partitioned replicas."""
        return self._op(stateless.key_by_op(fn), "key_by", name, True)

    def inspect(self, fn: Callable[[Any], Any], *, name: str | None = None) -> Stream:
        """Call ``fn(item)`` for a side effect (a live view) and pass items on."""
        return self._op(stateless.inspect_op(fn), "inspect", name, self.keyed)

    def rate_limit(
        self,
        per_second: float,
        *,
        burst: int | None = None,
        name: str | None = None,
        now: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> Stream:
        """At most ``per_second`` items per second (``burst`` at once) pass; the rest wait (backpressure)."""
        build = batching.rate_limit_op(per_second, burst, now, sleep)
        return self.flat_map_batch(name=name, build=build, label="rate_limit", keyed=self.keyed)

    def request(self, service: str, *, timeout: float = 30.0, name: str | None = None) -> Stream:
        """Call the named :class:`~taskstream.stream_ops.service.Service` with each item; the reply moves on."""
        from taskstream.stream_ops.service import request_op

        return self.flat_map_batch(name=name, build=request_op(service, timeout), label="request", keyed=None)

    # -- stateful operators ---------------------------------------------------------------------------

    def window(
        self,
        windower: Windower,
        clock: Clock | None = None,
        *,
        name: str | None = None,
        stage: str | None = None,
    ) -> WindowedStream:
        """Cut a keyed stream into windows (processing time unless ``clock`` is an ``EventClock``)."""
        from taskstream.stream_ops.windows.operator import WindowedStream

        return WindowedStream(self, windower, clock, name=name, stage=stage)

    def join(
        self,
        other: Stream,
        windower: Windower,
        clock: Clock | None = None,
        *,
        how: Literal["inner", "left", "outer"] = "inner",
        name: str | None = None,
        stage: str | None = None,
    ) -> WindowOut:
        """Join with another keyed stream within windows; see :mod:`taskstream.stream_ops.joins`."""
        from taskstream.stream_ops.joins import join_streams

        return join_streams(self, other, windower, clock, how=how, name=name, stage=stage)

    def batch(
        self,
        size: int,
        *,
        timeout: float | None = None,
        name: str | None = None,
        stage: str | None = None,
        now: Callable[[], float] | None = None,
    ) -> Stream:
        """Lists of at most ``size`` values per key, or fewer after ``timeout`` seconds or at end-of-stream.

        Keyed items ``(key, value)`` give ``(key, [values])``. On a stream known to be unkeyed (no ``key_by``
        before it) every item joins one list. Where the keying is unknown (after a ``map``, ``flat_map``,
        ``request`` or a merge of keyed and unkeyed streams) each item is looked at: keyed items are batched per
        key, the others together into plain lists.
        """
        builder = batching.batch_builder(size, timeout, now)
        timers = timeout is not None
        if self.keyed:
            return self.stateful(builder, name=name, stage=stage, uses_timers=timers, label="batch")
        # unkeyed items travel under a reserved key, so they share one list (and one replica)
        wrap = batching.key_all if self.keyed is False else batching.key_unkeyed
        keyed = self._op(wrap, "key_by", f"{name}-key" if name else None, True)
        out = keyed.stateful(builder, name=name, stage=stage, uses_timers=timers, label="batch")
        return out._op(batching.unkey, "map", f"{name}-unkey" if name else None, self.keyed)

    # -- helpers --------------------------------------------------------------------------------------

    def collect(self) -> list[Any]:
        """Sink into a list that fills as the pipeline runs (handy in tests and notebooks)."""
        from taskstream.stream_ops.sinks import ListSink

        sink = ListSink()
        self.sink(sink)
        return sink.items

    def print(self, prefix: str = "") -> None:
        """Sink to standard output, one line per item."""
        from taskstream.stream_ops.sinks import StdoutSink

        self.sink(StdoutSink(prefix=prefix))


class WindowOut(Stream):
    """The results of a window or join step; ``late`` carries the late records."""

    def __init__(self, pipeline: Pipeline, node_id: str, *, late: Stream) -> None:
        super().__init__(pipeline, node_id, "down", keyed=True)
        self.late = late


class BranchOut:
    """The two streams of a ``branch``: ``trues`` and ``falses`` (also unpackable)."""

    def __init__(self, trues: Stream, falses: Stream) -> None:
        self.trues = trues
        self.falses = falses

    def __iter__(self) -> Iterator[Stream]:
        return iter((self.trues, self.falses))

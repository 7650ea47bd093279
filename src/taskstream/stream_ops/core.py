"""The dataflow graph and the core primitives every operator is built from.

A pipeline is a graph of nodes. Only six kinds exist, and every public operator (``map``, ``window``, ``join``,
``batch``, ...) is a few lines over them:

==============  =====================================================================================
Primitive       What it does
==============  =====================================================================================
source          reads batches of items from a :class:`~taskstream.stream_ops.sources.Source`
flat_map_batch  a stateless function from a list of items to a list of items (sync or async)
branch          splits a stream in two by a predicate
merge           joins several streams into one
stateful        per-key logic with timers and a JSON snapshot (windows, joins, batching)
sink            writes items out through a :class:`~taskstream.stream_ops.sinks.Sink`
==============  =====================================================================================

Items are plain Python values. A *keyed* item is a ``(key, value)`` tuple whose key is a ``str``; stateful
nodes need keyed items, and a stage spread over replicas routes keyed items by a hash of the key.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from taskstream.errors import ConfigurationError

if TYPE_CHECKING:
    from taskstream.stream_ops.runtime_context import RuntimeContext
    from taskstream.stream_ops.sinks import Sink
    from taskstream.stream_ops.sources.base import Source
    from taskstream.stream_ops.stateful import KeyedLogic

__all__ = [
    "BatchFn",
    "BatchOp",
    "BranchNode",
    "Graph",
    "MergeNode",
    "Node",
    "OpNode",
    "SinkNode",
    "SourceNode",
    "StageNode",
    "StatefulNode",
    "is_async_callable",
    "is_keyed",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

BatchFn = Callable[[list[Any]], "list[Any] | Awaitable[list[Any]]"]
ItemFn = Callable[[Any], "list[Any] | Awaitable[list[Any]]"]


def is_keyed(item: Any) -> bool:
    """True for a ``(str, value)`` tuple, the shape of a keyed item."""
    return type(item) is tuple and len(item) == 2 and type(item[0]) is str


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True when calling ``fn`` returns a coroutine (``async def``, also through ``functools.partial``)."""
    target: Any = fn
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = type(target).__dict__.get("__call__")  # an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def check_name(what: str, name: str) -> str:
    """Validate a pipeline, stage or step name (letters, digits, ``-`` and ``_``)."""
    if not NAME_RE.match(name):
        raise ConfigurationError(
            f"{what} name {name!r} is not valid: use letters, digits, '-' and '_', starting with a letter or digit"
        )
    return name


@dataclass(slots=True)
class BatchOp:
    """A compiled stateless operation: the batch function, an optional per-item fallback, and whether it awaits.

    When the batch function raises, the runtime retries item by item with ``item`` (when given) so that only
    the failing items are dead-lettered and the rest go on. ``one_to_one`` says output ``i`` comes from input
    ``i`` (so an output that cannot be sent to another stage is dead-lettered as the record that produced it);
    ``subset`` says the outputs are some of the input objects themselves, in order (a filter), so each keeps the
    lineage of its input (:mod:`~taskstream.stream_ops.lineage`).
    """

    batch: BatchFn
    item: ItemFn | None = None
    is_async: bool = False
    chunk: int | None = None  # feed at most this many items per call (rate limiting)
    close: Callable[[], Awaitable[None]] | None = None
    one_to_one: bool = False
    subset: bool = False


@dataclass(eq=False)
class Node:
    """One step of the graph. ``inputs`` are ``(upstream node id, port)`` pairs."""

    id: str
    inputs: list[tuple[str, str]]
    ports: tuple[str, ...] = ("down",)
    stage: str | None = None  # explicit stage; None means "decided by the planner"

    @property
    def kind(self) -> str:
        return type(self).__name__.removesuffix("Node").lower()


@dataclass(eq=False)
class SourceNode(Node):
    source: Source | None = None


@dataclass(eq=False)
class OpNode(Node):
    """A stateless ``flat_map_batch``. ``build`` makes the operation for one runtime (it may need the broker)."""

    build: Callable[[RuntimeContext], BatchOp] | None = None
    label: str = "op"


@dataclass(eq=False)
class BranchNode(Node):
    predicate: Callable[[Any], Any] | None = None


@dataclass(eq=False)
class MergeNode(Node):
    pass


@dataclass(eq=False)
class StageNode(Node):
    """A pass-through that starts a new stage (``stream.stage(name)``)."""


@dataclass(eq=False)
class StatefulNode(Node):
    """Per-key logic. ``builder(ctx)`` returns the factory ``(key, snapshot_or_None) -> KeyedLogic`` of a runtime.

    ``keyed_input`` says every input stream is known to carry keyed items (made by ``key_by``, ...).
    """

    builder: Callable[[RuntimeContext], Callable[[str, Any], KeyedLogic]] | None = None
    label: str = "stateful"
    uses_timers: bool = False
    keyed_input: bool = False


@dataclass(eq=False)
class SinkNode(Node):
    sink: Sink | None = None


@dataclass
class Graph:
    """The nodes of one pipeline in creation order (which is a topological order)."""

    nodes: dict[str, Node] = field(default_factory=dict)
    _counter: int = 0

    def new_id(self, label: str, name: str | None) -> str:
        self._counter += 1
        node_id = check_name("step", name) if name else f"{label}-{self._counter}"
        if node_id in self.nodes:
            raise ConfigurationError(f"step name {node_id!r} is used twice in this pipeline")
        return node_id

    def add(self, node: Node) -> Node:
        for upstream, _port in node.inputs:
            if upstream not in self.nodes:
                raise ConfigurationError(f"step {node.id!r} reads from unknown step {upstream!r}")
        self.nodes[node.id] = node
        return node

    def children(self) -> dict[tuple[str, str], list[str]]:
        """``(node, port) -> [downstream node ids]``."""
        out: dict[tuple[str, str], list[str]] = {}
        for node in self.nodes.values():
            for edge in node.inputs:
                out.setdefault(edge, []).append(node.id)
        return out

    def upstream_ids(self, node_id: str) -> Sequence[str]:
        return [up for up, _ in self.nodes[node_id].inputs]


StageKind = Literal["source", "queue"]

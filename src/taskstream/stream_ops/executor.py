"""Runs the steps of one runtime (the fused pipeline, or one replica of a stage) on batches of items.

Each step becomes a small runtime object with ``feed(items)``; outputs go straight to the next step's
``feed`` (fused: no queue, no copy) or, across a stage boundary, into the :class:`Outbox`, which the runner
publishes before acking the input. Stateful steps keep per-key logic, a timer heap and the set of keys changed
since the last snapshot.

Items may travel with their lineage (``ids``, parallel to the items; see :mod:`~taskstream.stream_ops.lineage`):
a stateful step gives its window results and late records one, one-to-one steps keep it, and the Outbox derives
each published record's id from it (or from the batch's lineage when an item has none).
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from taskstream.stream_ops.core import (
    BatchOp,
    BranchNode,
    MergeNode,
    Node,
    OpNode,
    SinkNode,
    SourceNode,
    StageNode,
    StatefulNode,
    is_keyed,
)
from taskstream.stream_ops.lineage import SEP
from taskstream.stream_ops.outbox import DeadLetters, Ids, Outbox
from taskstream.stream_ops.plan import Plan, StagePlan
from taskstream.stream_ops.runtime_context import NodeStats, RuntimeContext
from taskstream.stream_ops.sinks import SinkWriter
from taskstream.stream_ops.stateful import Emit, KeyedLogic

__all__ = ["Executor"]

log = logging.getLogger("taskstream.stream_ops")

STATE_SEP = SEP


class _Target:
    """Steps of another stage fed by one output: each item is published once for all of them."""

    __slots__ = ("entries", "stage")

    def __init__(self, stage: StagePlan, entry: str) -> None:
        self.stage = stage
        self.entries = [entry]


class NodeRuntime:
    """Base: ``feed(items)`` processes a batch and emits to the step's targets per port."""

    def __init__(self, node: Node, ex: Executor) -> None:
        self.node = node
        self.ex = ex
        self.stats: NodeStats = ex.ctx.node_stats(node.id)
        self.targets: dict[str, list[NodeRuntime | _Target]] = {port: [] for port in node.ports}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def feed(self, items: list[Any], ids: Ids = None) -> None:
        """Process ``items``; ``ids`` (when given) is their lineage, one entry (or ``None``) per item."""
        raise NotImplementedError

    async def emit(self, port: str, items: list[Any], ids: Ids = None) -> None:
        if not items:
            return
        self.stats.items_out += len(items)
        targets = self.targets.get(port)
        if not targets:
            if port == "late":
                for item in items:
                    self.ex.dead.add(self.node.id, item, "late record, and no sink consumes this step's late output")
            return
        unsendable: dict[int, TypeError] | None = None
        for target in targets:
            if isinstance(target, NodeRuntime):
                await target.feed(items, ids)
            else:
                assert self.ex.outbox is not None
                origin = f"{self.node.id}:{port}"
                failed = self.ex.outbox.add(target.stage, target.entries, items, ids, origin)
                if failed:
                    unsendable = failed if unsendable is None else {**failed, **unsendable}
        if unsendable:
            self.unsendable(items, unsendable)

    def unsendable(self, items: list[Any], failed: dict[int, TypeError]) -> None:
        """Dead-letter outputs that cannot be encoded for another stage's queue (the rest went on)."""
        for index, exc in sorted(failed.items()):
            self.cannot_send(items[index], exc)

    def cannot_send(self, record: Any, exc: TypeError) -> None:
        reason = f"{type(exc).__name__}: {exc} (an output of step {self.node.id!r}, bound for another stage)"
        log.warning("step %r: an output cannot be encoded (%s); dead-lettered", self.node.id, exc)
        self.ex.dead.add(self.node.id, record, reason)

    def fail(self, item: Any, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        log.warning("step %r failed on an item (%s); dead-lettered", self.node.id, reason)
        self.ex.dead.add(self.node.id, item, f"{reason}\n{''.join(tb[-3:])}")


class PassRuntime(NodeRuntime):
    """Sources, merges and stage boundaries: pass items on."""

    async def feed(self, items: list[Any], ids: Ids = None) -> None:
        self.stats.items_in += len(items)
        await self.emit("down", items, ids)


class OpRuntime(NodeRuntime):
    def __init__(self, node: OpNode, ex: Executor) -> None:
        super().__init__(node, ex)
        assert node.build is not None
        self.op: BatchOp = node.build(ex.ctx)
        self.inputs: list[Any] = []  # the batch being emitted, to name the record behind an unsendable output

    async def close(self) -> None:
        if self.op.close is not None:
            await self.op.close()

    async def _call(self, items: list[Any]) -> list[Any]:
        out: Any = self.op.batch(items)
        if self.op.is_async or inspect.isawaitable(out):
            out = await out
        elif out and inspect.isawaitable(out[0]):  # a plain function that returned coroutines
            out = list(await asyncio.gather(*out))
        return out  # type: ignore[no-any-return]

    async def _apply(self, items: list[Any]) -> list[Any]:
        try:
            return await self._call(items)
        except Exception:
            if len(items) == 1:
                raise
        out: list[Any] = []
        for item in items:  # find the failing items; the others go on
            try:
                out.extend(await self._call([item]))
            except Exception as exc:
                self.fail(item, exc)
        return out

    async def feed(self, items: list[Any], ids: Ids = None) -> None:
        self.stats.items_in += len(items)
        chunk = self.op.chunk
        if chunk and len(items) > chunk:
            for i in range(0, len(items), chunk):
                await self._feed(items[i : i + chunk], None if ids is None else ids[i : i + chunk])
            return
        await self._feed(items, ids)

    async def _feed(self, items: list[Any], ids: Ids) -> None:
        try:
            out = await self._apply(items)
        except Exception as exc:
            self.fail(items[0], exc)
            return
        self.inputs = items
        await self.emit("down", out, self._lineage(items, ids, out))

    def _lineage(self, items: list[Any], ids: Ids, out: list[Any]) -> Ids:
        """The lineage of the outputs: input ``i``'s for output ``i`` of a one-to-one step, each kept input's for a
        subset step (matched by identity, in order); none otherwise."""
        if ids is None:
            return None
        if self.op.one_to_one and len(out) == len(items):
            return ids
        if not self.op.subset:
            return None
        kept: list[str | None] = []
        i = 0
        for value in out:
            while i < len(items) and items[i] is not value:
                i += 1
            if i == len(items):
                return None  # not a subset after all
            kept.append(ids[i])
            i += 1
        return kept

    def unsendable(self, items: list[Any], failed: dict[int, TypeError]) -> None:
        """Dead-letter the record that produced each unsendable output, when it is known: the batch's only
        record, or record ``i`` for output ``i`` of a one-to-one step (``map``, ``map_value``, ``key_by``)."""
        inputs = self.inputs
        if len(inputs) == 1:
            self.cannot_send(inputs[0], next(iter(failed.values())))
        elif self.op.one_to_one and len(inputs) == len(items):
            for index, exc in sorted(failed.items()):
                self.cannot_send(inputs[index], exc)
        else:
            super().unsendable(items, failed)


class BranchRuntime(NodeRuntime):
    def __init__(self, node: BranchNode, ex: Executor) -> None:
        super().__init__(node, ex)
        assert node.predicate is not None
        self.predicate = node.predicate

    async def feed(self, items: list[Any], ids: Ids = None) -> None:
        self.stats.items_in += len(items)
        yes: list[Any] = []
        no: list[Any] = []
        yes_ids: list[str | None] = []
        no_ids: list[str | None] = []
        pred = self.predicate
        for index, item in enumerate(items):
            try:
                ok = pred(item)
            except Exception as exc:
                self.fail(item, exc)
                continue
            (yes if ok else no).append(item)
            (yes_ids if ok else no_ids).append(ids[index] if ids is not None else None)
        await self.emit("true", yes, yes_ids if ids is not None else None)
        await self.emit("false", no, no_ids if ids is not None else None)


class StatefulRuntime(NodeRuntime):
    def __init__(self, node: StatefulNode, ex: Executor) -> None:
        super().__init__(node, ex)
        assert node.builder is not None
        self.make: Callable[[str, Any], KeyedLogic] = node.builder(ex.ctx)
        self.logics: dict[str, KeyedLogic] = {}
        self.dirty: set[str] = set()
        self.timers: list[tuple[float, str]] = []
        self.uses_timers = node.uses_timers
        # Items from steps known to key them (key_by, ...) of this runtime are unpacked unchecked (the fused hot
        # path); items read from a stage queue, or of unknown keying, are checked one by one.
        entries = ex.stage.entries if ex.stage is not None else ()
        self.trusted = node.keyed_input and node.id not in entries
        self.origin: dict[int, str] = {}  # id(value) -> id of the message it came in (during a feed)
        self.out_ids: dict[str, list[str | None]] = {}  # the lineage of the outputs being collected, per port

    def restore(self, states: dict[str, Any]) -> None:
        for key, state in states.items():
            logic = self.make(key, state)
            self.logics[key] = logic
            self._schedule(key, logic)

    def _schedule(self, key: str, logic: KeyedLogic) -> None:
        if self.uses_timers:
            at = logic.notify_at()
            if at is not None:
                heapq.heappush(self.timers, (at, key))

    def next_notify(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    def _group(self, items: list[Any]) -> dict[str, list[Any]]:
        """The values per key. Only ``(str, value)`` tuples are keyed items; anything else is dead-lettered."""
        if self.trusted:
            groups: dict[str, list[Any]] = {}
            try:
                for key, value in items:
                    group = groups.get(key)
                    if group is None:
                        groups[key] = [value]
                    else:
                        group.append(value)
                return groups
            except (TypeError, ValueError):
                pass
        groups = {}
        for item in items:
            if type(item) is tuple and len(item) == 2 and type(item[0]) is str:
                groups.setdefault(item[0], []).append(item[1])
            else:
                self.fail(item, TypeError(f"{self.node.id} needs keyed (str, value) tuples: call key_by first"))
        return groups

    async def feed(self, items: list[Any], ids: Ids = None) -> None:
        self.stats.items_in += len(items)
        out: dict[str, list[Any]] = {}
        logics = self.logics
        if ids is not None:  # a late record keeps the id of the message that brought it
            self.origin = {
                id(item[1]): mid for item, mid in zip(items, ids, strict=True) if mid is not None and is_keyed(item)
            }
        for key, values in self._group(items).items():
            logic = logics.get(key)
            if logic is None:
                logic = logics[key] = self.make(key, None)
            try:
                emitted = logic.on_batch(values)
            except Exception as exc:
                # The logic may have applied part of the batch: retrying values one by one could count them
                # twice, so the whole group is dead-lettered (logics should report bad values on "error").
                for value in values:
                    self.fail((key, value), exc)
                emitted = []
            self._collect(key, logic, emitted, out)
        self.origin = {}
        await self._emit_all(out)

    def _lineage(self, key: str, logic: KeyedLogic, port: str, value: Any) -> str | None:
        own = logic.output_id(port, value)
        if own is not None:
            return f"{self.node.id}{SEP}{port}{SEP}{key}{SEP}{own}"
        mid = self.origin.get(id(value))
        return None if mid is None else f"{self.node.id}{SEP}{port}{SEP}{mid}"

    def _collect(self, key: str, logic: KeyedLogic, emitted: Emit, out: dict[str, list[Any]]) -> None:
        self.dirty.add(key)
        for port, value in emitted:
            if port == "error":
                bad, exc = value
                self.fail((key, bad), exc)
                continue
            out.setdefault(port, []).append((key, value))
            self.out_ids.setdefault(port, []).append(self._lineage(key, logic, port, value))
        if logic.is_empty():
            del self.logics[key]
        else:
            self._schedule(key, logic)

    async def _emit_all(self, out: dict[str, list[Any]]) -> None:
        late = out.get("late")
        if late:
            self.stats.late += len(late)
        ids, self.out_ids = self.out_ids, {}
        for port in self.node.ports:
            items = out.get(port)
            if items:
                await self.emit(port, items, ids.get(port))

    async def tick(self, now: float) -> None:
        out: dict[str, list[Any]] = {}
        due: set[str] = set()
        while self.timers and self.timers[0][0] <= now:
            due.add(heapq.heappop(self.timers)[1])
        for key in sorted(due):
            logic = self.logics.get(key)
            if logic is not None:
                self._collect(key, logic, logic.on_notify(now), out)
        await self._emit_all(out)

    async def eof(self) -> None:
        out: dict[str, list[Any]] = {}
        for key in sorted(self.logics):
            logic = self.logics[key]
            self._collect(key, logic, logic.on_eof(), out)
        await self._emit_all(out)

    def snapshot_delta(self) -> dict[str, Any]:
        prefix = f"n{STATE_SEP}{self.node.id}{STATE_SEP}"
        delta = {}
        for key in self.dirty:
            logic = self.logics.get(key)
            delta[prefix + key] = logic.snapshot() if logic is not None else None
        self.dirty.clear()
        return delta


class SinkRuntime(NodeRuntime):
    def __init__(self, node: SinkNode, ex: Executor) -> None:
        super().__init__(node, ex)
        assert node.sink is not None
        self.sink = node.sink
        self.writer: SinkWriter | None = None

    async def open(self) -> None:
        self.writer = await self.sink.open(self.ex.ctx)

    async def feed(self, items: list[Any], ids: Ids = None) -> None:
        self.stats.items_in += len(items)
        assert self.writer is not None, "sink used before open"
        await self.writer.write(items)

    async def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            await writer.close()


class Executor:
    """The runtimes of the steps in ``scope`` wired together; see the module docstring."""

    def __init__(
        self,
        plan: Plan,
        ctx: RuntimeContext,
        *,
        stage: StagePlan | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.plan = plan
        self.ctx = ctx
        self.stage = stage
        self.outbox = outbox
        self.dead = DeadLetters(ctx)
        graph = plan.graph
        scope = set(stage.nodes) if stage else set(graph.nodes)
        self.order = [nid for nid in graph.nodes if nid in scope]
        self.runtimes: dict[str, NodeRuntime] = {}
        for nid in self.order:
            self.runtimes[nid] = self._make(graph.nodes[nid])
        for nid in self.order:
            node = graph.nodes[nid]
            for up, port in node.inputs:
                if up in self.runtimes:
                    self.runtimes[up].targets.setdefault(port, []).append(self.runtimes[nid])
        if stage is not None:  # edges leaving this stage
            for node in graph.nodes.values():
                if node.id in scope:
                    continue
                for up, port in node.inputs:
                    if up in scope:
                        target = plan.stages[plan.stage_of[node.id]]
                        targets = self.runtimes[up].targets.setdefault(port, [])
                        same = [t for t in targets if isinstance(t, _Target) and t.stage is target]
                        if same:
                            same[0].entries.append(node.id)
                        else:
                            targets.append(_Target(target, node.id))
        self.stateful = [r for r in self.runtimes.values() if isinstance(r, StatefulRuntime)]
        self.timed = [r for r in self.stateful if r.uses_timers]

    def _make(self, node: Node) -> NodeRuntime:
        if isinstance(node, OpNode):
            return OpRuntime(node, self)
        if isinstance(node, BranchNode):
            return BranchRuntime(node, self)
        if isinstance(node, StatefulNode):
            return StatefulRuntime(node, self)
        if isinstance(node, SinkNode):
            return SinkRuntime(node, self)
        if isinstance(node, SourceNode | MergeNode | StageNode):
            return PassRuntime(node, self)
        raise TypeError(f"unknown step kind {type(node).__name__}")

    async def open(self) -> None:
        for runtime in self.runtimes.values():
            await runtime.open()

    async def close(self) -> None:
        errors = []
        for runtime in self.runtimes.values():
            try:
                await runtime.close()
            except Exception as exc:  # close everything, then report
                errors.append(exc)
        if errors:
            raise errors[0]

    async def feed(self, node_id: str, items: list[Any], ids: Ids = None) -> None:
        await self.runtimes[node_id].feed(items, ids)

    def next_notify(self) -> float | None:
        times = [t for r in self.timed if (t := r.next_notify()) is not None]
        return min(times) if times else None

    async def tick(self, now: float) -> None:
        for runtime in self.timed:
            at = runtime.next_notify()
            if at is not None and at <= now:
                await runtime.tick(now)

    async def finish(self) -> None:
        """End-of-stream: flush stateful steps in topological order (their outputs reach later steps)."""
        for nid in self.order:
            runtime = self.runtimes[nid]
            if isinstance(runtime, StatefulRuntime):
                await runtime.eof()

    def restore(self, rows: dict[str, Any]) -> None:
        per_node: dict[str, dict[str, Any]] = {}
        for name, state in rows.items():
            if not name.startswith("n" + STATE_SEP):
                continue
            _, node_id, key = name.split(STATE_SEP, 2)
            per_node.setdefault(node_id, {})[key] = state
        for node_id, states in per_node.items():
            runtime = self.runtimes.get(node_id)
            if isinstance(runtime, StatefulRuntime):
                runtime.restore(states)

    def snapshot_delta(self) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        for runtime in self.stateful:
            delta.update(runtime.snapshot_delta())
        return delta

    def entry_nodes(self) -> Iterable[str]:
        return self.stage.entries if self.stage else ()

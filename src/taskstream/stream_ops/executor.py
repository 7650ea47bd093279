"""Runs the steps of one runtime (the fused pipeline, or one replica of a stage) on batches of items.

Each step becomes a small runtime object with ``feed(items)``; outputs go straight to the next step's
``feed`` (fused: no queue, no copy) or, across a stage boundary, into the :class:`Outbox`, which the runner
publishes before acking the input. Stateful steps keep per-key logic, a timer heap and the set of keys changed
since the last snapshot.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import traceback
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from taskstream.brokers.base import OutgoingMessage
from taskstream.intake import dead_letter_headers
from taskstream.messages import dumps
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
)
from taskstream.stream_ops.plan import Plan, StagePlan
from taskstream.stream_ops.runtime_context import NodeStats, RuntimeContext
from taskstream.stream_ops.sinks import SinkWriter
from taskstream.stream_ops.stateful import Emit, KeyedLogic
from taskstream.stream_ops.wire import record_message

__all__ = ["DeadLetters", "Executor", "Outbox"]

log = logging.getLogger("taskstream.stream_ops")

STATE_SEP = "\x1f"


class DeadLetters:
    """Records that could not be processed (a user function raised) or late records nobody consumes."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self.pending: list[OutgoingMessage] = []
        self.total = 0

    def add(self, node_id: str, item: Any, reason: str) -> None:
        self.total += 1
        try:
            body = dumps({"item": item})
        except TypeError:
            body = dumps({"item_repr": repr(item)[:2000]})
        headers = dead_letter_headers(
            {},
            reason,
            queue="",  # a record, not a delivery: it has no queue to go back to
            message_id=None,
            attempts=1,
            **{
                "x-pipeline": self.ctx.pipeline,
                "x-step": node_id,
                "x-stage": self.ctx.stage or "",
                "x-replica": self.ctx.replica,
            },
        )
        self.pending.append(OutgoingMessage(body, headers))
        self.ctx.node_stats(node_id).dead_lettered += 1


class Outbox:
    """Items bound for other stages, encoded per destination queue; ``sent`` counts per queue."""

    def __init__(self, plan: Plan, stage: StagePlan, replica: int, now: Callable[[], float]) -> None:
        self.plan = plan
        self.src = f"{stage.name}/{replica}"
        self.now = now
        self.pending: dict[str, list[OutgoingMessage]] = {}
        self.sent: dict[str, int] = {}
        self._rr: dict[str, int] = {}

    def add(self, target: StagePlan, entries: list[str], items: list[Any]) -> dict[int, TypeError] | None:
        """Encode ``items`` for ``target``'s queues.

        Returns:
            ``None`` when every item was queued; otherwise the index of each item that cannot be encoded
            (a value the wire format does not carry) and its error. The others are queued.
        """
        now = self.now()
        entry: str | list[str] = entries[0] if len(entries) == 1 else entries
        n = target.parallelism
        if n == 1:
            queue = target.queue(0)
            try:
                messages = [record_message(item, entry, self.src, now) for item in items]
            except TypeError:
                return self._add_each(target, entry, items, now)
            self.pending.setdefault(queue, []).extend(messages)
            self.sent[queue] = self.sent.get(queue, 0) + len(messages)
            return None
        return self._add_each(target, entry, items, now)

    def _add_each(
        self, target: StagePlan, entry: str | list[str], items: list[Any], now: float
    ) -> dict[int, TypeError] | None:
        failed: dict[int, TypeError] | None = None
        n = target.parallelism
        queues = target.queues
        for index, item in enumerate(items):
            try:
                message = record_message(item, entry, self.src, now)
            except TypeError as exc:
                if failed is None:
                    failed = {}
                failed[index] = exc
                continue
            if n == 1:
                replica = 0
            elif type(item) is tuple and len(item) == 2 and type(item[0]) is str:
                replica = zlib.crc32(item[0].encode()) % n
            else:
                replica = self._rr.get(target.name, 0)
                self._rr[target.name] = (replica + 1) % n
            queue = queues[replica]
            self.pending.setdefault(queue, []).append(message)
            self.sent[queue] = self.sent.get(queue, 0) + 1
        return failed

    def take(self) -> dict[str, list[OutgoingMessage]]:
        pending, self.pending = self.pending, {}
        return pending


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

    async def feed(self, items: list[Any]) -> None:
        raise NotImplementedError

    async def emit(self, port: str, items: list[Any]) -> None:
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
                await target.feed(items)
            else:
                assert self.ex.outbox is not None
                failed = self.ex.outbox.add(target.stage, target.entries, items)
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

    async def feed(self, items: list[Any]) -> None:
        self.stats.items_in += len(items)
        await self.emit("down", items)


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

    async def feed(self, items: list[Any]) -> None:
        self.stats.items_in += len(items)
        chunk = self.op.chunk
        if chunk and len(items) > chunk:
            for i in range(0, len(items), chunk):
                await self._feed(items[i : i + chunk])
            return
        await self._feed(items)

    async def _feed(self, items: list[Any]) -> None:
        try:
            out = await self._apply(items)
        except Exception as exc:
            self.fail(items[0], exc)
            return
        self.inputs = items
        await self.emit("down", out)

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

    async def feed(self, items: list[Any]) -> None:
        self.stats.items_in += len(items)
        yes: list[Any] = []
        no: list[Any] = []
        pred = self.predicate
        try:
            for item in items:
                (yes if pred(item) else no).append(item)
        except Exception:
            yes, no = [], []
            for item in items:
                try:
                    (yes if pred(item) else no).append(item)
                except Exception as exc:
                    self.fail(item, exc)
        await self.emit("true", yes)
        await self.emit("false", no)


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

    async def feed(self, items: list[Any]) -> None:
        self.stats.items_in += len(items)
        out: dict[str, list[Any]] = {}
        logics = self.logics
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
        await self._emit_all(out)

    def _collect(self, key: str, logic: KeyedLogic, emitted: Emit, out: dict[str, list[Any]]) -> None:
        self.dirty.add(key)
        for port, value in emitted:
            if port == "error":
                bad, exc = value
                self.fail((key, bad), exc)
                continue
            out.setdefault(port, []).append((key, value))
        if logic.is_empty():
            del self.logics[key]
        else:
            self._schedule(key, logic)

    async def _emit_all(self, out: dict[str, list[Any]]) -> None:
        late = out.get("late")
        if late:
            self.stats.late += len(late)
        for port in self.node.ports:
            items = out.get(port)
            if items:
                await self.emit(port, items)

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

    async def feed(self, items: list[Any]) -> None:
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

    async def feed(self, node_id: str, items: list[Any]) -> None:
        await self.runtimes[node_id].feed(items)

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

"""The runner: one loop for a fused pipeline and for one replica of a stage.

Per input batch (a source batch, or deliveries from the stage's queue):

1. feed the items through the runtime's steps (fused steps are plain calls);
2. publish what crossed into other stages (and dead letters) and wait until the broker has it;
3. commit a snapshot to the state store: the changed keys of stateful steps, end-of-stream accounting, the
   ids of the messages just applied and the position of resumable sources;
4. ack the input.

A crash between 2 and 4 redelivers the input (or, for a source stage, reads the source again from the committed
position): the snapshot says which ids were applied already, so they are skipped (no double counting). The
outputs published again carry the ids they had (derived from their lineage, :mod:`~taskstream.stream_ops.lineage`),
so the replica downstream skips them too. A crash before 3 loses nothing: the state is the previous snapshot and
the input comes back.

End-of-stream: a finite source ending, or every upstream replica's ``eos`` (each carrying how many records it
sent here, so a record still in flight after a restart is waited for), or a ``Stop``, or the stage's bounds
(``max_messages``, ``idle_timeout``) end the runtime: windows are flushed, outputs published, and ``eos`` sent
to every replica of every downstream stage.

Large records (claim-check, :mod:`taskstream.payloads`): what is published goes through
``Producer.offload_outgoing`` (bodies over the broker's threshold go to the payload store, a reference travels);
a reference read from the stage queue is resolved before the batch is fed, and its blob is deleted after the
delivery is acked. A missing or corrupt payload dead-letters the message (keeping its reference) with the
reason; a store that cannot be reached requeues it with a growing pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from taskstream.brokers.base import Broker, Delivery, OutgoingMessage, Subscription
from taskstream.errors import BrokerConnectionError, ConfigurationError, MalformedMessage, MessageError
from taskstream.intake import Intake, Refused
from taskstream.messages import is_envelope_document
from taskstream.observe.metrics import recorder_for
from taskstream.observe.tracing import tracing_for
from taskstream.payloads.claimcheck import ClaimCheck, PayloadRef
from taskstream.producer import Producer
from taskstream.stream_ops.accounting import Accounting
from taskstream.stream_ops.core import SourceNode
from taskstream.stream_ops.executor import Executor
from taskstream.stream_ops.inbound import (
    Run,
    bad_record_message,
    entry_of,
    independent_entries,
    per_step,
    read_records,
)
from taskstream.stream_ops.lineage import AppliedIds, derive_id
from taskstream.stream_ops.outbox import Outbox
from taskstream.stream_ops.plan import Plan, StagePlan
from taskstream.stream_ops.readers import read_queue, read_source
from taskstream.stream_ops.runtime_context import NodeStats, RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch
from taskstream.stream_ops.state import StateStore
from taskstream.stream_ops.wire import (
    BatchLimits,
    control_message,
    is_batch,
    read_batch,
    read_record,
)

__all__ = ["DEFAULT_BATCH_SIZE", "RunConfig", "RunResult", "Runner"]

DEFAULT_BATCH_SIZE = 1024  # items per source batch (measured: 256 left S8 waiting on publisher confirms)
DEFAULT_PREFETCH = 256  # unacked deliveries at most, by default: each may be a record batch
MAX_INPUT_BYTES = 1024 * 1024  # an input batch from a stage queue stops growing past this many bytes of bodies

log = logging.getLogger("taskstream.stream_ops")


@dataclass(frozen=True)
class RunConfig:
    """How a runtime batches and bounds its work.

    Attributes:
        batch_size: most items read from a source and processed together, and most deliveries read together
            from a stage queue (which stop early at ``MAX_INPUT_BYTES`` of bodies: a delivery between stages
            is a record batch).
        prefetch: most unacked deliveries held (default ``4 * batch_size``, at most 256).
        linger: seconds to wait for more deliveries to fill a batch once one arrived.
        max_queue_depth: a stage pauses publishing while a downstream queue holds more than this (``None``: no
            limit); keeps memory bounded when a later stage is slow.
        fresh: forget this replica's snapshot before starting (a new run, not a restart).
        remember_per_sender: how many ids of the records applied from each upstream sender a snapshot keeps, to
            skip redeliveries and records published again.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    prefetch: int | None = None
    linger: float = 0.005
    max_queue_depth: int | None = 10_000
    fresh: bool = False
    remember_per_sender: int = 4096


@dataclass
class RunResult:
    """What a run did. ``stats`` has counters per step."""

    pipeline: str
    stage: str | None
    replica: int
    stats: dict[str, NodeStats]
    dead_lettered: int = 0
    late: int = 0
    received: int = 0
    duplicates_skipped: int = 0
    restored: bool = False
    ended_by: str = "end-of-stream"
    duration: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        where = f"stage {self.stage!r} replica {self.replica}" if self.stage else "fused"
        return (
            f"pipeline {self.pipeline!r} ({where}) ended by {self.ended_by} after {self.duration:.2f} s: "
            f"{self.received} input items, {self.late} late, {self.dead_lettered} dead-lettered"
        )


class Runner:
    """Runs a whole pipeline fused (``stage=None``) or one replica of one stage.

    ``claim_check`` says where records too large for the broker go (default: from settings, see
    :mod:`taskstream.payloads`); ``ClaimCheck.disabled()`` makes them fail with ``MessageTooLarge``.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        broker: Broker,
        stage: str | None = None,
        replica: int = 0,
        store: StateStore | None = None,
        now: Callable[[], float] = time.time,
        config: RunConfig | None = None,
        claim_check: ClaimCheck | None = None,
    ) -> None:
        self.plan = plan
        self.broker = broker
        self.claim_check = claim_check if claim_check is not None else ClaimCheck.from_settings()
        self.producer = Producer(broker, claim_check=self.claim_check)
        self.config = config or RunConfig()
        self.stage: StagePlan | None = plan.stage(stage) if stage is not None else None
        if self.stage is not None and not 0 <= replica < self.stage.parallelism:
            raise ConfigurationError(
                f"stage {stage!r} has {self.stage.parallelism} replica(s); replica {replica} does not exist"
            )
        self.replica = replica
        self.store = store
        self.ctx = RuntimeContext(plan.pipeline, stage, replica, broker, now, claim_check=self.claim_check)
        self.metrics = recorder_for(broker)  # step counters are read from ctx.stats when scraped
        self.metrics.watch_runtime(self.ctx)
        self.tracing = tracing_for(broker)
        limits = BatchLimits(min(BatchLimits().max_bytes, self.producer.inline_limit))
        self.outbox = Outbox(plan, self.stage, replica, now, limits) if self.stage is not None else None
        self.executor = Executor(plan, self.ctx, stage=self.stage, outbox=self.outbox)
        self.namespace = f"{plan.pipeline}/{stage}/{replica}"
        self.src = f"{stage}/{replica}"
        resumable = any(source.resumable for source in self.sources.values())
        self.uses_store = self.stage is not None and bool(self.stage.entries or self.stage.stateful or resumable)
        self.independent = self.stage is not None and independent_entries(plan, self.stage)
        # end-of-stream accounting (persisted in the snapshot)
        self.accounting = Accounting(plan, stage, replica)
        self.applied = AppliedIds(self.config.remember_per_sender)
        self.positions: dict[str, Any] = {}  # source step -> where it stands (resumable sources)
        self.emitted: dict[str, int] = {}  # source step -> items taken from it (their lineage)
        self.received = 0
        self.duplicates = 0
        self.bad_records = 0  # records of batches dead-lettered alone
        self.stop_requested = False
        self.raw_dead: list[OutgoingMessage] = []
        self.intake: Intake | None = None
        self._declared: set[str] = set()
        self._published_since_check: dict[str, int] = {}
        self._subscription: Subscription | None = None

    # -- set-up ---------------------------------------------------------------------------------------

    @property
    def sources(self) -> dict[str, Source]:
        nodes = (
            self.stage.sources
            if self.stage
            else [n.id for n in self.plan.graph.nodes.values() if isinstance(n, SourceNode)]
        )
        out = {}
        for node_id in nodes:
            node = self.plan.graph.nodes[node_id]
            assert isinstance(node, SourceNode) and node.source is not None
            out[node_id] = node.source
        return out

    async def _declare(self, queue: str) -> None:
        if queue not in self._declared:
            await self.broker.declare(queue)
            self._declared.add(queue)

    async def _restore(self) -> bool:
        """Load this replica's snapshot. Returns True when it says the replica already finished."""
        assert self.store is not None
        if self.config.fresh:
            await self.store.clear(self.namespace)
            return False
        rows = await self.store.load(self.namespace)
        meta = rows.get("meta")
        if not meta:
            return False
        self.executor.restore(rows)
        self.accounting.restore(meta)
        self.received = int(meta.get("received", 0))
        if self.outbox is not None:
            self.outbox.sent = dict(meta.get("sent", {}))
        self.positions = dict(meta.get("positions", {}))
        self.emitted = {k: int(v) for k, v in meta.get("emitted", {}).items()}
        self.applied.restore(rows)
        for ids in meta.get("applied", []):  # snapshots written before ids were kept per sender
            for mid in ids:
                self.applied.add("", mid)
        log.info("%s: restored snapshot (%d keys of state)", self.namespace, len(rows) - 1)
        return bool(meta.get("finished"))

    # -- the loop -------------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        started = time.perf_counter()
        result = RunResult(self.plan.pipeline, self.ctx.stage, self.replica, self.ctx.stats)
        stage = self.stage
        if stage is not None:
            for queue in {q for name in stage.downstream for q in self.plan.stages[name].queues}:
                await self._declare(queue)
        await self.executor.open()
        readers: list[asyncio.Task[None]] = []
        inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(maxsize=1)
        try:
            if self.uses_store:
                if self.store is None:
                    raise ConfigurationError(f"stage {self.ctx.stage!r} keeps state and needs a state store")
                finished = await self._restore()
                result.restored = bool(self.accounting.counts or self.accounting.eos or self.received)
                if finished:
                    await self._send_eos()
                    await self.store.clear(self.namespace)
                    result.ended_by = "already finished (end-of-stream sent again)"
                    return result
            sources = self.sources
            for node_id, source in sources.items():
                batches = source.open_batches(self.ctx, self.config.batch_size, self.positions.get(node_id))
                readers.append(
                    asyncio.create_task(read_source(node_id, source, batches, inbox), name=f"source:{node_id}")
                )
            if stage is not None and stage.entries:
                queue = stage.queue(self.replica)
                await self._declare(queue)
                self.intake = Intake(
                    self.broker, queue, claim_check=self.claim_check, dead_letter_queue=self.plan.dead_letter_queue
                )
                prefetch = self.config.prefetch or min(4 * self.config.batch_size, DEFAULT_PREFETCH)
                self._subscription = self.broker.consume(queue, prefetch=prefetch)
                reader = read_queue(
                    self._subscription, inbox, self.config.batch_size, self.config.linger, MAX_INPUT_BYTES
                )
                readers.append(asyncio.create_task(reader, name=f"queue:{queue}"))
            result.ended_by = await self._loop(inbox, len(sources))
            await self._finish()
        finally:
            for task in readers:
                task.cancel()
            for task in readers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self._subscription is not None:
                with contextlib.suppress(Exception):
                    await self._subscription.close()
            await self.executor.close()
            result.duration = time.perf_counter() - started
            result.received = self.received
            result.duplicates_skipped = self.duplicates
            unreadable = self.intake.stats.dead_lettered if self.intake is not None else 0
            result.dead_lettered = self.executor.dead.total + unreadable + self.bad_records
            result.late = sum(s.late for s in self.ctx.stats.values())
        log.info("%s", result.summary())
        return result

    async def _loop(self, inbox: asyncio.Queue[tuple[Any, ...]], n_sources: int) -> str:
        stage = self.stage
        sources_left = n_sources
        has_queue = stage is not None and bool(stage.entries)
        idle = stage.idle_timeout if stage is not None else None
        max_messages = stage.max_messages if stage is not None else None
        last_input = time.monotonic()
        while True:
            if not has_queue and sources_left == 0:
                return "end-of-stream"
            if has_queue and sources_left == 0:
                if self.stop_requested:
                    return "stop"
                if self.accounting.complete():
                    return "end-of-stream"
                if max_messages is not None and self.received >= max_messages:
                    return f"max_messages ({max_messages})"
            timeout: float | None = None
            due = self.executor.next_notify()
            if due is not None:
                timeout = max(0.0, due - self.ctx.now())
            if idle is not None:
                left = max(0.0, last_input + idle - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            try:
                async with asyncio.timeout(timeout):
                    message = await inbox.get()
            except TimeoutError:
                if idle is not None and time.monotonic() - last_input >= idle:
                    return f"idle_timeout ({idle} s)"
                if self.outbox is not None:
                    self.outbox.begin(f"tick@{self.ctx.now()!r}")
                await self.executor.tick(self.ctx.now())
                await self._flush()
                await self._commit()
                continue
            kind = message[0]
            if kind == "error":
                raise message[1]
            if kind == "source-end":
                sources_left -= 1
                continue
            last_input = time.monotonic()
            if kind == "source":
                _, node_id, batch = message
                assert isinstance(batch, SourceBatch)
                self.received += len(batch.items)
                ids = self._source_lineage(node_id, batch)
                with self.tracing.source_batch(self.plan.pipeline, node_id, len(batch.items)):
                    await self.executor.feed(node_id, batch.items, ids)
                    if batch.position is not None:
                        self.positions[node_id] = batch.position
                    await self._after_batch()
                if batch.ack is not None:
                    await batch.ack()
            elif kind == "deliveries":
                deliveries: list[Delivery] = message[1]
                assert self.intake is not None
                dead_before = self.intake.stats.dead_lettered
                with self.tracing.process_batch(self.intake.queue, deliveries):
                    settle, refs = await self._apply(deliveries, max_messages)
                    await self._after_batch()
                for delivery in settle:
                    await delivery.ack()
                self.intake.metrics.handled(len(settle) - (self.intake.stats.dead_lettered - dead_before))
                for ref in refs:  # acked for good: the payloads can go
                    await self.claim_check.release(ref)
            elif kind == "queue-end":
                raise BrokerConnectionError(f"the subscription to {stage.queue(self.replica)!r} ended")  # type: ignore[union-attr]

    def _source_lineage(self, node_id: str, batch: SourceBatch) -> list[str | None] | None:
        """Each item's lineage: the source step and the item's place in the source (stable across restarts, however
        the items are batched); ``None`` in a fused run (nothing is published to other stages)."""
        if self.outbox is None:
            return None
        self.outbox.begin(f"{node_id}@{self.positions.get(node_id)!r}")
        first = self.emitted.get(node_id, 0)
        self.emitted[node_id] = first + len(batch.items)
        if batch.ids is not None:  # items with ids of their own (queue messages): unique across runs
            return [f"{node_id}:{i}" if i is not None else f"{node_id}#{first + n}" for n, i in enumerate(batch.ids)]
        return [f"{node_id}#{first + i}" for i in range(len(batch.items))]

    async def _after_batch(self) -> None:
        if self.executor.timed:
            await self.executor.tick(self.ctx.now())
        await self._flush()
        await self._commit()

    async def _apply(
        self, deliveries: list[Delivery], max_messages: int | None
    ) -> tuple[list[Delivery], list[PayloadRef]]:
        """Decode and feed a batch of deliveries; returns those to ack and the payload references to release
        after the ack (not those of dead-lettered messages: they keep their payload)."""
        assert self.stage is not None and self.intake is not None
        entries = self.stage.entries
        settle: list[Delivery] = []
        ids: list[str] = []
        refs: list[PayloadRef] = []
        groups: list[tuple[str | tuple[str, ...], list[Any], list[str | None]]] = []
        for index, delivery in enumerate(deliveries):
            if self.stop_requested or (max_messages is not None and self.received >= max_messages):
                for rest in deliveries[index:]:
                    await rest.nack(requeue=True)  # behind a Stop or over the bound: not ours to take
                break
            read = await self._read(delivery, entries)
            if read is None:  # retried later
                continue
            settle.append(delivery)
            routed, ref = read
            if ref is not None:
                refs.append(ref)
            for entry, items, mids in routed:  # none for a duplicate
                if mids[0] is not None:  # a plain JSON message has no id
                    ids.extend(mids)  # type: ignore[arg-type]
                if entry is None:  # a control message
                    continue
                self.received += len(items)
                if groups and groups[-1][0] == entry:
                    groups[-1][1].extend(items)
                    groups[-1][2].extend(mids)
                else:
                    groups.append((entry, items, mids))
        if self.outbox is not None:  # ids of what this batch sends: from the ids of its messages (when needed)
            self.outbox.begin(lambda: derive_id(*sorted(ids)))
        if len(groups) > 1 and self.independent:  # records for several entries: one feed per entry step
            groups = per_step(groups)  # type: ignore[assignment]
        for group_entry, items, item_ids in groups:
            for node_id in group_entry if isinstance(group_entry, tuple) else (group_entry,):
                await self.executor.feed(node_id, items, item_ids)
        return settle, refs

    async def _read(self, delivery: Delivery, entries: list[str]) -> tuple[list[Run], PayloadRef | None] | None:
        """Decode and route one delivery: its runs (none when it was dead-lettered or duplicate) and payload
        reference; ``None`` when it is to be retried later (not settled now).

        The decoded document (a record batch: two lists per record) is dropped when this returns, before the
        batch is fed: held through the feed, it would outlive the garbage collector's young generations and make
        its full collections (tens of ms each, over every object of the process) come several times a run.
        """
        assert self.intake is not None
        intake = self.intake
        opened = await intake.read(delivery)
        if isinstance(opened, Refused):
            reason = opened.reason
            if opened.transient:
                give_up = intake.give_up_reason(delivery, reason)
                if give_up is None:
                    await intake.retry_later(delivery)
                    return None
                reason = give_up
            self.raw_dead.append(intake.dead_letter_message(delivery, reason))
            return [], None
        try:
            return self._route(opened.doc, delivery, entries), opened.ref
        except MessageError as exc:
            self.raw_dead.append(intake.dead_letter_message(delivery, str(exc)))
        except Exception as exc:  # nothing a message holds may stop a stage
            reason = f"unreadable message: {type(exc).__name__}: {exc}"
            self.raw_dead.append(intake.dead_letter_message(delivery, reason))
        return [], None

    def _route(self, doc: Any, delivery: Delivery, entries: list[str]) -> list[Run]:
        """The records a decoded message brings as runs ``(entry step(s), items, ids)`` (none for a duplicate):
        the entry is ``None`` for a control message (applied here).

        Raises:
            MessageError: the message cannot go anywhere in this stage (the reason is the dead letter's).
        """
        if not is_envelope_document(doc):  # plain JSON from a foreign producer
            if len(entries) != 1:
                raise MalformedMessage("raw message on a stage queue with several entry steps")
            return [(entries[0], [doc], [None])]
        if is_batch(doc):
            return self._route_batch(doc, delivery, entries)
        record = read_record(doc, delivery.message_id)
        if record.id in self.applied:
            self.duplicates += 1
            return []
        if record.kind == "control":
            self._control(record.body)
            self.applied.add("control", record.id)
            return [(None, [], [record.id])]
        if record.kind != "record":
            raise MalformedMessage(f"malformed message: a stage reads records, not envelopes of kind {record.kind!r}")
        entry = entry_of(record.to, entries)
        if record.src:
            self.accounting.count(record.src, record.group, record.key)
        self.applied.add(record.src or "", record.id)
        item = (record.key, record.body) if record.key is not None else record.body
        return [(entry, [item], [record.id])]

    def _route_batch(self, doc: dict[str, Any], delivery: Delivery, entries: list[str]) -> list[Run]:
        """The records of a record batch not applied yet; a malformed record is dead-lettered alone."""
        assert self.intake is not None
        src, raw = read_batch(doc)
        read = read_records(raw, src, entries, self.applied.ids)
        self.duplicates += read.duplicates
        for index, entry, reason in read.bad:
            self.bad_records += 1
            log.warning(
                "dead-lettering record %d of batch %s on %r: %s", index, doc.get("id"), self.intake.queue, reason
            )
            message = bad_record_message(
                delivery, self.intake.queue, doc.get("id"), index, entry, reason, self.plan.pipeline
            )
            self.raw_dead.append(message)
        if src:
            self.accounting.count_groups(src, read.groups)
        self.applied.add_many(src or "", read.fresh)
        return read.runs()

    def _control(self, body: Any) -> None:
        """Apply a control message.

        Raises:
            MalformedMessage: an end-of-stream whose ``from`` is not a string or ``sent`` not counts per group.
        """
        control = body.get("control") if isinstance(body, dict) else None
        if control == "eos":
            self.accounting.end_of_stream(body)
        elif control == "stop":
            log.info("%s: Stop received", self.namespace)
            self.stop_requested = True
        else:
            log.warning("%s: ignoring unknown control message %r", self.namespace, body)

    # -- publishing, snapshots, end-of-stream ---------------------------------------------------------

    async def _publish(self, queue: str, messages: list[OutgoingMessage]) -> None:
        await self.producer.publish_batch(queue, messages)  # large records travel by reference

    async def _flush(self) -> None:
        pending = self.outbox.take() if self.outbox is not None else {}
        dead = self.executor.dead.pending + self.raw_dead
        self.executor.dead.pending = []
        self.raw_dead = []
        if dead:
            await self._declare(self.plan.dead_letter_queue)
            pending.setdefault(self.plan.dead_letter_queue, []).extend(dead)
        if not pending:
            return
        await asyncio.gather(*(self._publish(q, msgs) for q, msgs in pending.items()))
        limit = self.config.max_queue_depth
        if limit is not None and self.outbox is not None:
            for queue, msgs in pending.items():
                if queue == self.plan.dead_letter_queue:
                    continue
                count = self._published_since_check.get(queue, 0) + len(msgs)
                if count < max(1, limit // 10):
                    self._published_since_check[queue] = count
                    continue
                self._published_since_check[queue] = 0
                while await self.broker.depth(queue) > limit:
                    await asyncio.sleep(0.05)  # the stage behind is slow: wait for it (backpressure)

    def _meta(self, finished: bool) -> dict[str, Any]:
        return {
            "counts": self.accounting.counts,
            "eos": self.accounting.eos,
            "received": self.received,
            "sent": self.outbox.sent if self.outbox is not None else {},
            "positions": self.positions,
            "emitted": self.emitted,
            "finished": finished,
        }

    async def _commit(self, *, finished: bool = False) -> None:
        if not self.uses_store or self.store is None:
            return
        updates = self.executor.snapshot_delta()
        updates.update(self.applied.changes())
        updates["meta"] = self._meta(finished)
        started = self.metrics.timer()
        await self.store.commit(self.namespace, updates)
        self.metrics.snapshot(self.plan.pipeline, self.ctx.stage, started, len(updates))

    async def _send_eos(self) -> None:
        if self.stage is None:
            return
        sent = self.outbox.sent if self.outbox is not None else {}
        for name in self.stage.downstream:
            for queue in self.plan.stages[name].queues:
                message = control_message({"control": "eos", "from": self.src, "sent": sent.get(name, {})})
                await self._declare(queue)
                await self.broker.publish(queue, message.body, headers=message.headers, message_id=message.message_id)

    async def _finish(self) -> None:
        if self.outbox is not None:
            self.outbox.begin("end-of-stream")
        await self.executor.finish()
        await self._flush()
        await self._commit(finished=True)
        await self._send_eos()
        if self.uses_store and self.store is not None:
            await self.store.clear(self.namespace)

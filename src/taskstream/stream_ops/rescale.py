"""Change a stage's parallelism between runs without losing state: ``taskstream pipeline rescale``.

Keys hash to a fixed number of key groups that the replicas own in ranges (:mod:`.keygroups`), so a stage
that goes from ``N`` to ``M`` replicas hands whole groups to new owners. With every replica of the pipeline
stopped (killed or stopped mid-run; none finished), :func:`rescale_stage`:

1. loads the snapshots of the ``N`` old replicas and writes ``M`` new ones: each key's window state goes to
   the owner of its group, the per-group end-of-stream counts with it; end-of-streams already received and the
   ids already applied go to every new replica; what the stage sent downstream is summed;
2. moves the records waiting on the old replicas' queues to the queues of their groups' new owners (a record
   batch is split by owner, each record keeping its id; single messages keep body, headers and id; control
   messages go to every new queue), acking the old copies after the new ones are published.

Then start the pipeline with the new parallelism: sources resume at their positions, upstream stages route
by the new owners, and the results are those of an uninterrupted run. Run it once per change, with a backup of
the state store: it rewrites the stage's snapshots in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from taskstream.brokers.base import Broker, Delivery, OutgoingMessage
from taskstream.errors import ConfigurationError
from taskstream.messages import is_envelope_document
from taskstream.stream_ops.keygroups import KEY_GROUPS, group_of, owner
from taskstream.stream_ops.lineage import BATCH_ROW, ROW, SEP
from taskstream.stream_ops.plan import queue_name
from taskstream.stream_ops.state import StateStore
from taskstream.stream_ops.wire import batch_messages, is_batch

if TYPE_CHECKING:
    from taskstream.stream_ops.pipeline import Pipeline

__all__ = ["RescaleReport", "rescale_stage"]

log = logging.getLogger("taskstream.stream_ops")


@dataclass
class RescaleReport:
    """What :func:`rescale_stage` moved."""

    stage: str
    old: int
    new: int
    keys: int = 0
    messages: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        moved = ", ".join(f"{q}: {n}" for q, n in self.messages.items()) or "none"
        return (
            f"stage {self.stage!r}: {self.old} -> {self.new} replicas; state of {self.keys} key(s) moved to their "
            f"groups' owners; queued messages moved: {moved}"
        )


async def rescale_stage(
    pipeline: Pipeline, stage: str, old_replicas: int, *, broker: Broker, store: StateStore
) -> RescaleReport:
    """Move ``stage`` of ``pipeline`` from ``old_replicas`` to the parallelism the pipeline now declares.

    Raises:
        ConfigurationError: the stage reads a source, a replica already finished, or a count is not valid.
    """
    plan = pipeline.plan()
    st = plan.stage(stage)
    new = st.parallelism
    if not isinstance(old_replicas, int) or old_replicas < 1:
        raise ConfigurationError(f"the old replica count must be a positive integer, got {old_replicas!r}")
    if st.sources:
        raise ConfigurationError(f"stage {stage!r} reads a source: it has one replica and cannot be rescaled")
    report = RescaleReport(stage, old_replicas, new)
    if new == old_replicas:
        return report
    spaces = [f"{plan.pipeline}/{stage}/{i}" for i in range(old_replicas)]
    olds = [await store.load(ns) for ns in spaces]
    for ns, rows in zip(spaces, olds, strict=True):
        if (rows.get("meta") or {}).get("finished"):
            raise ConfigurationError(f"replica {ns} already finished: rescale only a run stopped mid-way")
    rows_out, report.keys = _split(olds, new)
    for i in range(max(new, old_replicas)):
        ns = f"{plan.pipeline}/{stage}/{i}"
        await store.clear(ns)
        if i < new and rows_out[i]:
            await store.commit(ns, rows_out[i])
    old_queues = [queue_name(plan.pipeline, stage, i) for i in range(old_replicas)]
    for queue in old_queues:
        report.messages[queue] = await _move_queue(broker, queue, st.queues)
    log.info("%s", report.summary())
    return report


def _split(olds: list[dict[str, Any]], new: int) -> tuple[list[dict[str, Any]], int]:
    """The new replicas' snapshot rows from the old ones'; and how many keys' state moved."""
    out: list[dict[str, Any]] = [{} for _ in range(new)]
    applied: dict[str, list[str]] = {}
    batches: dict[str, Any] = {}
    keys = 0
    metas = [rows.get("meta") or {} for rows in olds]
    for rows in olds:
        for name, value in rows.items():
            if name.startswith("n" + SEP):
                key = name.split(SEP, 2)[2]
                out[owner(group_of(key), new)][name] = value
                keys += 1
            elif name.startswith(ROW) and isinstance(value, list) and len(value) == 2:
                applied.setdefault(str(value[0]), []).append(name[len(ROW) :])
            elif name.startswith(BATCH_ROW):  # the ids of one record batch: every new replica keeps them
                batches[name] = value
    if not any(metas):
        return out, keys
    for i in range(new):
        counts: dict[str, dict[str, int]] = {}
        for meta in metas:
            for up, per in (meta.get("counts") or {}).items():
                mine = {g: n for g, n in per.items() if owner(int(g), new) == i}
                target = counts.setdefault(up, {})
                for g, n in mine.items():
                    target[g] = target.get(g, 0) + n
        eos: dict[str, Any] = {}
        for meta in metas:
            eos.update(meta.get("eos") or {})
        sent: dict[str, dict[str, int]] = {}
        if i == 0:  # downstream sums what every replica of this stage sent: one replica carries the total
            for meta in metas:
                for down, per in (meta.get("sent") or {}).items():
                    target = sent.setdefault(down, {})
                    for g, n in per.items():
                        target[g] = target.get(g, 0) + n
        received = sum(int(meta.get("received", 0)) for meta in metas) if i == 0 else 0
        out[i]["meta"] = {
            "counts": counts,
            "eos": eos,
            "received": received,
            "sent": sent,
            "positions": {},
            "finished": False,
        }
        for sender, ids in applied.items():
            for n, mid in enumerate(ids, 1):
                out[i][ROW + mid] = [sender, n]
        out[i].update(batches)
    return out, keys


def _target(body: bytes, queues: list[str], turn: int) -> list[str]:
    """The new queue(s) of a message read from an old queue: its group's owner; every queue for control."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [queues[turn % len(queues)]]
    if not is_envelope_document(doc):
        return [queues[turn % len(queues)]]
    if doc.get("kind") == "control":
        return list(queues)
    headers = doc.get("headers") if isinstance(doc.get("headers"), dict) else {}
    group = headers.get("g")
    key = doc.get("key")
    if not (type(group) is int and 0 <= group < KEY_GROUPS):
        group = group_of(key) if isinstance(key, str) else turn % KEY_GROUPS
    return [queues[owner(group, len(queues))]]


def _split_batch(body: bytes, queues: list[str]) -> dict[str, list[OutgoingMessage]] | None:
    """A record batch read from an old queue as batches for the new owners of its records' groups (``None``
    when the message is not a record batch; records without a valid group go to the first queue)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not is_envelope_document(doc) or not is_batch(doc) or not isinstance(doc.get("body"), list):
        return None
    headers = doc.get("headers") if isinstance(doc.get("headers"), dict) else {}
    src = str(headers.get("src") or "")
    per_queue: dict[str, list[tuple[str, bytes]]] = {}
    for entry in doc["body"]:
        group = entry[2] if isinstance(entry, list) and len(entry) == 5 else None
        target = queues[owner(group, len(queues))] if type(group) is int and 0 <= group < KEY_GROUPS else queues[0]
        mid = str(entry[0]) if isinstance(entry, list) and entry else ""
        per_queue.setdefault(target, []).append((mid, orjson.dumps(entry)))
    created = doc.get("created_at")
    now = float(created) if isinstance(created, int | float) else 0.0
    return {target: batch_messages(records, src, now) for target, records in per_queue.items()}


async def _move_queue(broker: Broker, queue: str, queues: list[str]) -> int:
    """Re-route the messages waiting on ``queue`` to ``queues``; returns how many moved."""
    await broker.declare(queue)
    for q in queues:
        await broker.declare(q)
    count = await broker.depth(queue)
    if count == 0:
        return 0
    subscription = broker.consume(queue, prefetch=min(count, 512))
    taken: list[Delivery] = []
    try:
        while len(taken) < count:
            taken.append(await subscription.__anext__())
        for turn, delivery in enumerate(taken):
            split = _split_batch(delivery.body, queues)
            if split is not None:  # a record batch: its records go to their groups' new owners
                for target, messages in split.items():
                    await broker.publish_batch(target, messages)
                continue
            for target in _target(delivery.body, queues, turn):
                await broker.publish(target, delivery.body, headers=delivery.headers, message_id=delivery.message_id)
        for delivery in taken:
            await delivery.ack()
    finally:
        await subscription.close()
    return len(taken)

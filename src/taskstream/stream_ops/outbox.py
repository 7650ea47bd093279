"""Where the outputs of a runtime wait to be published: records bound for other stages, and dead letters.

The runner publishes what the :class:`Outbox` and :class:`DeadLetters` hold after each input batch, before
it commits its snapshot and acks the input. The Outbox gives each record the id derived from its lineage
(:mod:`~taskstream.stream_ops.lineage`) and routes each record to the replica owning its key group
(:mod:`~taskstream.stream_ops.keygroups`), counting what it sent per downstream stage and group for
end-of-stream. Each record is encoded when it is added (so one that cannot be encoded is known at once); what
a batch sends to one queue leaves as record batches (:func:`~taskstream.stream_ops.wire.pack_records`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from functools import cache
from itertools import repeat
from operator import itemgetter
from typing import Any

from taskstream.brokers.base import OutgoingMessage
from taskstream.intake import dead_letter_headers
from taskstream.messages import dumps
from taskstream.stream_ops.keygroups import KEY_GROUPS, group_of, owner
from taskstream.stream_ops.lineage import SEP, derive_id
from taskstream.stream_ops.plan import Plan, StagePlan
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.wire import ALL_ENTRIES, BatchLimits, pack_records

__all__ = ["DeadLetters", "Ids", "Outbox"]

Ids = list[str | None] | None
_GROUP = itemgetter(2)  # the key group of a record (id, to, g, key, value)
_KEY, _VALUE = itemgetter(0), itemgetter(1)  # of a keyed item (key, value)
# A record as the outbox holds it: a tuple, encoded as the list [id, to, g, key, value]. Tuples of untracked values
# (strings, numbers, dicts of those) leave the garbage collector's lists at its first pass; lists never do.
Row = tuple[Any, ...]


@cache
def _owners(replicas: int) -> list[int]:
    """The replica (of ``replicas``) owning each key group."""
    return [owner(group, replicas) for group in range(KEY_GROUPS)]


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
    """Items bound for other stages, encoded per destination queue; ``sent`` counts per stage and key group."""

    def __init__(
        self,
        plan: Plan,
        stage: StagePlan,
        replica: int,
        now: Callable[[], float],
        limits: BatchLimits | None = None,
    ) -> None:
        self.plan = plan
        self.stage = stage.name
        self.src = f"{stage.name}/{replica}"
        self.now = now
        self.limits = limits or BatchLimits()
        # per queue: encoded chunks of records, (records (id, to, g, key, value), their JSON list)
        self.pending: dict[str, list[tuple[list[Row], bytes]]] = {}
        self.sent: dict[str, dict[str, int]] = {}  # per downstream stage: records sent per key group
        self._rr: dict[str, int] = {}
        self._lineage: str | Callable[[], str] = ""
        self._made: dict[str, int] = {}
        self._groups: dict[str, int] = {}

    def begin(self, lineage: str | Callable[[], str]) -> None:
        """A new input batch: items without a lineage of their own get ids derived from ``lineage`` (a function
        giving it is called once, when the first such item is added: most batches have none)."""
        self._lineage = lineage
        self._made = {}

    @property
    def lineage(self) -> str:
        """The lineage of the input batch (see :meth:`begin`)."""
        if not isinstance(self._lineage, str):
            self._lineage = self._lineage()
        return self._lineage

    def _ids(self, target: StagePlan, origin: str, items: list[Any], ids: Ids) -> list[str]:
        """The record id of each item bound for ``target`` (see :mod:`~taskstream.stream_ops.lineage`)."""
        # derive_id(self.stage, lineage, origin, target.name), inlined: it runs once per record
        head, tail = f"{self.stage}{SEP}", f"{SEP}{origin}{SEP}{target.name}"
        blake2b = hashlib.blake2b
        if ids is not None and None not in ids:  # the common case: every item has its lineage
            return [blake2b(f"{head}{lineage}{tail}".encode(), digest_size=16).hexdigest() for lineage in ids]
        out = []
        for index in range(len(items)):
            lineage = ids[index] if ids is not None else None
            if lineage is None:
                n = self._made.get(target.name, 0)
                self._made[target.name] = n + 1
                out.append(derive_id(self.src, "batch", self.lineage, target.name, n))
            else:
                out.append(blake2b(f"{head}{lineage}{tail}".encode(), digest_size=16).hexdigest())
        return out

    def add(
        self, target: StagePlan, entries: list[str], items: list[Any], ids: Ids = None, origin: str = ""
    ) -> dict[int, TypeError] | None:
        """Encode ``items`` for ``target``'s queues; ``ids`` is their lineage, ``origin`` the emitting step/port.

        The records bound for one queue are encoded in one ``dumps`` call (the same bytes as one call per
        record, joined); only when that fails are they encoded one by one, to find the items that cannot be.

        Returns:
            ``None`` when every item was queued; otherwise the index of each item that cannot be encoded
            (a value the wire format does not carry) and its error. The others are queued.
        """
        entry: str | tuple[str, ...]  # every entry of the target in its order: "*", one short string to decode
        entry = entries[0] if len(entries) == 1 else ALL_ENTRIES if entries == target.entries else tuple(entries)
        mids = self._ids(target, origin, items, ids)
        n = target.parallelism
        groups = self._groups
        if len(groups) > 65536:  # a cache of key -> group, kept small
            groups.clear()
        keyed = self._rows_keyed(entry, items, mids)
        rows: list[Row] = [] if keyed is None else keyed
        if keyed is None:  # not all keyed: record by record
            for item, mid in zip(items, mids, strict=True):
                if type(item) is tuple and len(item) == 2 and type(item[0]) is str:
                    key = item[0]
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = group_of(key)
                    rows.append((mid, entry, group, key, item[1]))
                else:
                    group = self._rr.get(target.name, 0)
                    self._rr[target.name] = (group + 1) % KEY_GROUPS
                    rows.append((mid, entry, group, None, item))
        per_replica = [rows]
        if n > 1 and rows:
            owners = _owners(n)
            replicas = list(map(owners.__getitem__, map(_GROUP, rows)))
            if replicas.count(replicas[0]) == len(replicas):  # all for one replica
                per_replica = [[] for _ in range(n)]
                per_replica[replicas[0]] = rows
            else:
                per_replica = [[] for _ in range(n)]
                for row, replica in zip(rows, replicas, strict=True):
                    per_replica[replica].append(row)
        chunks: list[tuple[int, list[Row], bytes]] = []
        try:
            for replica, part in enumerate(per_replica):
                if part:
                    chunks.append((replica, part, dumps(part)))
        except TypeError:
            return self._add_one_by_one(target, rows)
        sent = self.sent.setdefault(target.name, {})
        for replica, part, data in chunks:
            self.pending.setdefault(target.queues[replica], []).append((part, data))
        for group, count in Counter(map(_GROUP, rows)).items():
            g = str(group)
            sent[g] = sent.get(g, 0) + count
        return None

    def _rows_keyed(self, entry: str | tuple[str, ...], items: list[Any], mids: list[str]) -> list[Row] | None:
        """The records ``(id, to, g, key, value)`` of ``items`` when all are keyed ``(str, value)`` tuples, made
        column by column at C speed; ``None`` otherwise."""
        if not items or set(map(type, items)) != {tuple} or set(map(len, items)) != {2}:
            return None
        keys, values = list(map(_KEY, items)), list(map(_VALUE, items))  # no iterator per item (GC allocations)
        if set(map(type, keys)) != {str}:
            return None
        known = self._groups
        found = list(map(known.get, keys))
        if None in found:
            for key in set(keys):
                if key not in known:
                    known[key] = group_of(key)
            found = list(map(known.__getitem__, keys))
        return list(zip(mids, repeat(entry), found, keys, values))

    def _add_one_by_one(self, target: StagePlan, rows: list[Row]) -> dict[int, TypeError]:
        """Queue ``rows`` encoded one by one; those that cannot be encoded are left out and returned."""
        failed: dict[int, TypeError] = {}
        sent = self.sent.setdefault(target.name, {})
        n = target.parallelism
        for index, row in enumerate(rows):
            try:
                data = dumps([row])
            except TypeError as exc:
                failed[index] = exc
                continue
            group = row[2]
            self.pending.setdefault(target.queues[owner(group, n)], []).append(([row], data))
            g = str(group)
            sent[g] = sent.get(g, 0) + 1
        return failed

    def take(self) -> dict[str, list[OutgoingMessage]]:
        """The record batches to publish, per queue (and forget them)."""
        pending, self.pending = self.pending, {}
        now = self.now()
        return {queue: pack_records(chunks, self.src, now, self.limits) for queue, chunks in pending.items()}

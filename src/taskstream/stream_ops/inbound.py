"""Reading the records of a record batch (:mod:`~taskstream.stream_ops.wire`) on a stage queue.

A batch whose records are all well formed, new and each for one step (the usual one) is checked column by
column at C speed (``zip(*records)``, the set of each column's types); any other is read record by record: a
well-formed one costs a handful of type checks and a set lookup, one that is not is checked again field by field
(:func:`~taskstream.stream_ops.wire.read_entry`) for the reason it is dead-lettered with, alone: the records
around it are applied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, cast

from taskstream.brokers.base import Delivery, OutgoingMessage
from taskstream.errors import MalformedMessage, MessageError
from taskstream.intake import dead_letter_headers
from taskstream.messages import dumps
from taskstream.stream_ops.keygroups import KEY_GROUPS
from taskstream.stream_ops.plan import Plan, StagePlan
from taskstream.stream_ops.wire import ALL_ENTRIES, read_entry

__all__ = ["BatchRead", "Run", "bad_record_message", "entry_of", "independent_entries", "per_step", "read_records"]

# Records for the same entry step(s), in order: (entry, items, their ids); the entry is None for a control
# message (applied by the runner), an id None for a plain JSON message (it has none)
Run = tuple[str | tuple[str, ...] | None, list[Any], list[str | None]]


@dataclass
class BatchRead:
    """What a record batch brings: the records to apply (their ids, entry steps and items, in order), counts per
    key group, the malformed ones."""

    fresh: list[str] = field(default_factory=list)  # the ids of the records to apply
    targets: list[str | tuple[str, ...]] = field(default_factory=list)  # the entry step(s) of each
    items: list[Any] = field(default_factory=list)  # each as the stage reads it: (key, value) or the value
    groups: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    bad: list[tuple[int, Any, str]] = field(default_factory=list)  # (index, record, reason)

    def runs(self) -> list[Run]:
        """The records as runs of the same entry step(s): ``(entry, items, ids)``, in order."""
        targets = self.targets
        if not targets:
            return []
        first = targets[0]
        if targets.count(first) == len(targets):  # the usual case: every record for one step
            return [(first, self.items, cast(list[str | None], self.fresh))]
        out: list[Run] = []
        for target, item, mid in zip(targets, self.items, self.fresh, strict=True):
            if out and out[-1][0] == target:
                out[-1][1].append(item)
                out[-1][2].append(mid)
            else:
                out.append((target, [item], [mid]))
        return out


def entry_of(to: Any, entries: list[str]) -> str | tuple[str, ...]:
    """The entry step(s) a record's ``to`` names (``"*"``: all of them), checked against the stage's ``entries``.

    Raises:
        MalformedMessage: a step that is not an entry of this stage.
    """
    if to == ALL_ENTRIES and entries:
        return entries[0] if len(entries) == 1 else tuple(entries)
    to = to or (entries[0] if len(entries) == 1 else "")
    entry = tuple(to) if isinstance(to, list) else to
    targets = entry if isinstance(entry, tuple) else (entry,)
    if not all(t in entries for t in targets):
        raise MalformedMessage(f"record for step {to!r}, which is not an entry of this stage")
    return entry


def read_records(raw: list[Any], src: str | None, entries: list[str], applied: Container[str]) -> BatchRead:
    """Check and route the records ``raw`` of a batch from ``src``; ids in ``applied`` are duplicates."""
    fast = _read_well_formed(raw, entries, applied)
    if fast is not None:
        return fast
    out = BatchRead()
    fresh, targets, items, groups = out.fresh, out.targets, out.items, out.groups
    seen: set[str] = set()
    many: dict[tuple[str, ...], tuple[str, ...]] = {}  # lists of steps already checked (a record for several)
    every = entry_of(ALL_ENTRIES, entries) if entries else ""
    for index, entry in enumerate(raw):
        if type(entry) is list and len(entry) == 5:
            mid, to, group, key, body = entry
            if to == ALL_ENTRIES:
                to = every
            elif type(to) is list:
                try:
                    to = many.get(tuple(to), "")
                except TypeError:  # an unhashable step name: the slow path says why
                    to = ""
            if (
                type(mid) is str
                and mid
                and (to in entries or type(to) is tuple)
                and type(group) is int
                and 0 <= group < KEY_GROUPS
                and (key is None or type(key) is str)
            ):
                if mid in applied or mid in seen:
                    out.duplicates += 1
                    continue
                seen.add(mid)
                fresh.append(mid)
                groups[group] = groups.get(group, 0) + 1
                targets.append(to)
                items.append(body if key is None else (key, body))
                continue
        try:  # the slow path: a record for several steps not seen yet, or a malformed one (for the reason)
            record = read_entry(entry, src)
            target = entry_of(record.to, entries)
        except MessageError as exc:
            out.bad.append((index, entry, str(exc)))
            continue
        if type(target) is tuple:
            many[target] = target
        if record.id in applied or record.id in seen:
            out.duplicates += 1
            continue
        seen.add(record.id)
        fresh.append(record.id)
        assert record.group is not None
        groups[record.group] = groups.get(record.group, 0) + 1
        targets.append(target)
        items.append(record.body if record.key is None else (record.key, record.body))
    return out


_NONE = type(None)
_COLUMNS = [itemgetter(i) for i in range(5)]  # id, to, g, key, value of a record


def _read_well_formed(raw: list[Any], entries: list[str], applied: Container[str]) -> BatchRead | None:
    """The usual batch, read column by column at C speed: every record well formed, all for the same step(s) or
    each for one step, none applied before and none twice. ``None`` for anything else (the record by record
    path)."""
    if not raw or set(map(type, raw)) != {list} or set(map(len, raw)) != {5}:
        return None
    mids, tos, groups, keys, bodies = [list(map(column, raw)) for column in _COLUMNS]  # no iterator per record
    if set(map(type, mids)) != {str} or "" in mids:
        return None
    targets: list[str | tuple[str, ...]]
    to = tos[0]
    if tos.count(to) == len(tos):  # every record for the same step(s)
        if to == ALL_ENTRIES and entries:
            to = entries if len(entries) > 1 else entries[0]
        if not (type(to) is str or (type(to) is list and to and set(map(type, to)) == {str})):
            return None
        target = to if type(to) is str else tuple(to)
        if not set(target if type(target) is tuple else (target,)) <= set(entries):
            return None
        targets = [target] * len(tos)
    elif set(map(type, tos)) == {str} and set(tos) <= set(entries):
        targets = list(tos)
    else:
        return None
    if set(map(type, groups)) != {int} or min(groups) < 0 or max(groups) >= KEY_GROUPS:
        return None
    key_types = set(map(type, keys))
    if not key_types <= {str, _NONE} or any(map(applied.__contains__, mids)) or len(set(mids)) != len(mids):
        return None
    if key_types == {str}:
        items = list(zip(keys, bodies, strict=True))
    elif key_types == {_NONE}:
        items = list(bodies)
    else:
        items = [body if key is None else (key, body) for key, body in zip(keys, bodies, strict=True)]
    return BatchRead(mids, targets, items, dict(Counter(groups)))


def bad_record_message(
    delivery: Delivery, queue: str, batch_id: Any, index: int, entry: Any, reason: str, pipeline: str
) -> OutgoingMessage:
    """The dead letter of one record of a batch: the record alone, the reason, and where it was."""
    try:
        body = dumps(entry)
    except TypeError:
        body = dumps({"item_repr": repr(entry)[:2000]})
    headers = dead_letter_headers(
        {},
        reason,
        queue=queue,
        message_id=delivery.message_id,
        attempts=delivery.attempt,
        **{"x-batch-id": str(batch_id), "x-batch-index": index, "x-pipeline": pipeline},
    )
    return OutgoingMessage(body, headers)


def independent_entries(plan: Plan, stage: StagePlan) -> bool:
    """True when no step of ``stage`` is reached from two of its entry steps: the order in which different entries
    are fed is then not seen by any step (each keeps the order of its own input)."""
    inside = set(stage.nodes)
    children = plan.graph.children()
    seen: set[str] = set()
    for entry in stage.entries:
        reach, todo = {entry}, [entry]
        while todo:
            node_id = todo.pop()
            for (up, _), downs in children.items():
                if up == node_id:
                    for down in downs:
                        if down in inside and down not in reach:
                            reach.add(down)
                            todo.append(down)
        if reach & seen:
            return False
        seen |= reach
    return True


def per_step(runs: Iterable[tuple[str | tuple[str, ...], list[Any], list[str | None]]]) -> list[Run]:
    """The items of ``runs`` (in order, each for one entry step or several) as one run per entry step, in order
    of first appearance: every step gets its items in the order it would have had them run by run, in one feed
    (a sink then writes once per input batch, not once per message)."""
    merged: dict[str, tuple[list[Any], list[str | None]]] = {}
    for entry, items, ids in runs:
        for node_id in entry if isinstance(entry, tuple) else (entry,):
            held = merged.get(node_id)
            if held is None:
                merged[node_id] = (list(items), list(ids))
            else:
                held[0].extend(items)
                held[1].extend(ids)
    return [(node_id, items, ids) for node_id, (items, ids) in merged.items()]

"""Reading the records of a record batch (:mod:`~taskstream.stream_ops.wire`) on a stage queue.

Per record, a well-formed one costs a handful of type checks and a set lookup; one that is not is checked
again field by field (:func:`~taskstream.stream_ops.wire.read_entry`) for the reason it is dead-lettered with,
alone: the records around it are applied.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from taskstream.brokers.base import Delivery, OutgoingMessage
from taskstream.errors import MalformedMessage, MessageError
from taskstream.intake import dead_letter_headers
from taskstream.messages import dumps
from taskstream.stream_ops.keygroups import KEY_GROUPS
from taskstream.stream_ops.wire import read_entry

__all__ = ["BatchRead", "Routed", "bad_record_message", "read_records"]

Routed = tuple[str | None, str | tuple[str, ...] | None, Any]  # (record id, entry step(s), item)


@dataclass
class BatchRead:
    """What a record batch brings: the records to apply, their ids, counts per key group, the malformed ones."""

    routed: list[Routed] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    groups: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    bad: list[tuple[int, Any, str]] = field(default_factory=list)  # (index, record, reason)


def entry_of(to: Any, entries: list[str]) -> str | tuple[str, ...]:
    """The entry step(s) a record's ``to`` names, checked against the stage's ``entries``.

    Raises:
        MalformedMessage: a step that is not an entry of this stage.
    """
    to = to or (entries[0] if len(entries) == 1 else "")
    entry = tuple(to) if isinstance(to, list) else to
    targets = entry if isinstance(entry, tuple) else (entry,)
    if not all(t in entries for t in targets):
        raise MalformedMessage(f"record for step {to!r}, which is not an entry of this stage")
    return entry


def read_records(raw: list[Any], src: str | None, entries: list[str], applied: Container[str]) -> BatchRead:
    """Check and route the records ``raw`` of a batch from ``src``; ids in ``applied`` are duplicates."""
    out = BatchRead()
    routed, fresh, groups = out.routed, out.fresh, out.groups
    seen: set[str] = set()
    many: dict[tuple[str, ...], tuple[str, ...]] = {}  # lists of steps already checked (a record for several)
    for index, entry in enumerate(raw):
        if type(entry) is list and len(entry) == 5:
            mid, to, group, key, body = entry
            if type(to) is list:
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
                routed.append((mid, to, body if key is None else (key, body)))
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
        routed.append((record.id, target, record.body if record.key is None else (record.key, record.body)))
    return out


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

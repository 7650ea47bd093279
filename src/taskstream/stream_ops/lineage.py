"""Record ids derived from where a record comes from, and the memory of ids a replica has applied.

A record published to another stage gets an id derived from its lineage, so the same record published again
(by a replica that died after publishing and before its snapshot, and processed its input again) carries the
same id, and the replica downstream skips it:

=============================================  ==================================================================
Record                                         Lineage its id is derived from
=============================================  ==================================================================
a source's record                              the source step and the record's place in the source
a window's result                              the window step, the key and the window (``start``, ``end``)
a late record                                  the step and the id of the message that brought it
anything else (after ``flat_map``, ...)        the input batch (a source: where the batch starts; a queue: the ids
                                               of its messages), the destination stage and the place in the batch
=============================================  ==================================================================

Steps that map one record to one (``map``, ``key_by``) or keep some of them (``filter``, ``inspect``,
``rate_limit``, branches) pass the lineage on. The last row is stable only when the batch is made again the
same way, which redelivery does not promise. See docs/streams.md "Delivery guarantees".

:class:`AppliedIds` remembers, per upstream sender, the ids of the last records applied from it. Its snapshot
is compact: one row per applied *message* (a record batch's row lists the ids of its records that were new),
so a commit writes a few rows per input batch, not one per record.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

__all__ = ["BATCH_ROW", "ROW", "AppliedIds", "derive_id"]

SEP = "\x1f"
ROW = f"a{SEP}"  # one id: a<SEP><id> -> [sender, n]
BATCH_ROW = f"b{SEP}"  # one batch message: b<SEP><sender><SEP><n> -> [sender, n, [ids]]


def derive_id(*parts: object) -> str:
    """A 32-hex-digit id from ``parts`` (the same parts give the same id)."""
    text = SEP.join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class AppliedIds:
    """Ids of the records applied recently: at least ``per_sender`` per upstream sender, and every id applied
    since the commit before the last.

    A redelivered message and a record published again upstream both come from a sender's latest outputs, so
    a memory per sender keeps them however many other senders a replica reads. Ids are forgotten only at a
    commit (:meth:`changes`) and never those of the input batch just committed, so a redelivered input batch is
    recognised whole however many records its messages carry.
    """

    def __init__(self, per_sender: int) -> None:
        self.per_sender = per_sender
        self.ids: set[str] = set()
        self._order: dict[str, collections.deque[tuple[int, str, list[str]]]] = {}  # (n, row, ids)
        self._held: dict[str, int] = {}  # ids held per sender
        self._seq: dict[str, int] = {}
        self._floor: dict[str, int] = {}  # a sender's sequence number at the last commit
        self._changes: dict[str, Any] = {}

    def __contains__(self, mid: str) -> bool:
        return mid in self.ids

    def add(self, sender: str, mid: str) -> None:
        """Remember ``mid`` (a single message) from ``sender``."""
        if mid in self.ids:
            return
        n = self._push(sender, ROW + mid, [mid])
        self._changes[ROW + mid] = [sender, n]

    def add_many(self, sender: str, mids: list[str]) -> None:
        """Remember the ids of the records of one batch from ``sender`` (those not remembered yet): one row."""
        ids = self.ids
        fresh = list(mids) if ids.isdisjoint(mids) else [mid for mid in mids if mid not in ids]  # a list of its own
        if not fresh:
            return
        n = self._seq.get(sender, 0) + 1
        row = f"{BATCH_ROW}{sender}{SEP}{n}"
        self._push(sender, row, fresh)
        self._changes[row] = [sender, n, fresh]

    def _push(self, sender: str, row: str, mids: list[str]) -> int:
        n = self._seq.get(sender, 0) + 1
        self._seq[sender] = n
        self._order.setdefault(sender, collections.deque()).append((n, row, mids))
        self._held[sender] = self._held.get(sender, 0) + len(mids)
        self.ids.update(mids)
        return n

    def _forget_old(self) -> None:
        """Forget the oldest entries beyond ``per_sender`` ids, except those added since the last commit."""
        for sender, order in self._order.items():
            floor = self._floor.get(sender, 0)
            held = self._held[sender]
            while order and order[0][0] <= floor and held - len(order[0][2]) >= self.per_sender:
                _, row, mids = order.popleft()
                held -= len(mids)
                self.ids.difference_update(mids)
                self._changes[row] = None
            self._held[sender] = held
            self._floor[sender] = self._seq.get(sender, 0)

    def restore(self, rows: dict[str, Any]) -> None:
        """Rebuild from the snapshot rows (``a<SEP><id>: [sender, n]``, ``b<SEP><sender><SEP><n>: [sender, n,
        ids]``)."""
        entries = []
        for name, value in rows.items():
            if not isinstance(value, list) or not value or not isinstance(value[0], str):
                continue
            if name.startswith(ROW) and len(value) == 2:
                entries.append((value[0], int(value[1]), name, [name[len(ROW) :]]))
            elif name.startswith(BATCH_ROW) and len(value) == 3 and isinstance(value[2], list):
                entries.append((value[0], int(value[1]), name, [str(mid) for mid in value[2]]))
        for sender, n, row, mids in sorted(entries, key=lambda e: (e[0], e[1])):
            self._order.setdefault(sender, collections.deque()).append((n, row, mids))
            self._held[sender] = self._held.get(sender, 0) + len(mids)
            self._seq[sender] = max(self._seq.get(sender, 0), n)
            self._floor[sender] = self._seq[sender]
            self.ids.update(mids)

    def changes(self) -> dict[str, Any]:
        """The rows to put (and, as ``None``, to delete) since the last call (a commit)."""
        self._forget_old()
        out, self._changes = self._changes, {}
        return out

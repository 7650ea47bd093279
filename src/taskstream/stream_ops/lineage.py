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

:class:`AppliedIds` remembers, per upstream sender, the ids of the last records applied from it; it lives in the
replica's snapshot as one row per id, so a commit writes only what changed.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

__all__ = ["AppliedIds", "derive_id"]

SEP = "\x1f"
ROW = f"a{SEP}"


def derive_id(*parts: object) -> str:
    """A 32-hex-digit id from ``parts`` (the same parts give the same id)."""
    text = SEP.join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class AppliedIds:
    """Ids of the records applied recently, at most ``per_sender`` per upstream sender.

    A redelivered message and a record published again upstream both come from a sender's latest outputs, so
    a memory per sender keeps them however many other senders a replica reads.
    """

    def __init__(self, per_sender: int) -> None:
        self.per_sender = per_sender
        self.ids: set[str] = set()
        self._order: dict[str, collections.deque[tuple[int, str]]] = {}
        self._seq: dict[str, int] = {}
        self._changes: dict[str, Any] = {}

    def __contains__(self, mid: str) -> bool:
        return mid in self.ids

    def add(self, sender: str, mid: str) -> None:
        """Remember ``mid`` from ``sender``; forget that sender's oldest id beyond the limit."""
        if mid in self.ids:
            return
        n = self._seq.get(sender, 0) + 1
        self._seq[sender] = n
        order = self._order.setdefault(sender, collections.deque())
        order.append((n, mid))
        self.ids.add(mid)
        self._changes[ROW + mid] = [sender, n]
        while len(order) > self.per_sender:
            _, old = order.popleft()
            self.ids.discard(old)
            self._changes[ROW + old] = None

    def restore(self, rows: dict[str, Any]) -> None:
        """Rebuild from the snapshot rows (``a<SEP><id>: [sender, n]``)."""
        entries = sorted(
            (value[0], int(value[1]), name[len(ROW) :])
            for name, value in rows.items()
            if name.startswith(ROW) and isinstance(value, list) and len(value) == 2
        )
        for sender, n, mid in entries:
            self._order.setdefault(sender, collections.deque()).append((n, mid))
            self._seq[sender] = max(self._seq.get(sender, 0), n)
            self.ids.add(mid)

    def changes(self) -> dict[str, Any]:
        """The rows to put (and, as ``None``, to delete) since the last call."""
        out, self._changes = self._changes, {}
        return out

"""End-of-stream accounting of one stage replica, per upstream stage and key group.

Each upstream replica counts what it sends to a stage per key group and says so in its end-of-stream
(``{"control": "eos", "from": "stage/replica", "sent": {group: n}}``). A replica has seen everything once every
upstream replica's end-of-stream came and, for each group it owns, it applied as many records of that group from
that upstream stage as the upstream replicas together sent. Counting per group (not per queue or replica) keeps
the accounting true when a stage's parallelism changes: groups move with their counts
(:mod:`~taskstream.stream_ops.rescale`).
"""

from __future__ import annotations

from typing import Any

from taskstream.errors import MalformedMessage
from taskstream.stream_ops.keygroups import KEY_GROUPS, group_of, groups_of
from taskstream.stream_ops.plan import Plan

__all__ = ["Accounting"]


class Accounting:
    """What this replica applied per upstream stage and group (``counts``), and the end-of-streams it got."""

    def __init__(self, plan: Plan, stage: str | None, replica: int) -> None:
        self.plan = plan
        self.stage = stage
        self.counts: dict[str, dict[str, int]] = {}
        self.eos: dict[str, dict[str, int]] = {}
        if stage is not None:
            self.owned = [str(g) for g in groups_of(replica, plan.stages[stage].parallelism)]
            self.expected = plan.upstream_replicas(stage)

    def count(self, src: str, group: int | None, key: str | None) -> None:
        """A record from upstream replica ``src`` was applied."""
        if group is None:
            group = group_of(key) if key is not None else 0
        per_group = self.counts.setdefault(src.rsplit("/", 1)[0], {})
        g = str(group)
        per_group[g] = per_group.get(g, 0) + 1

    def count_groups(self, src: str, groups: dict[int, int]) -> None:
        """Records from upstream replica ``src`` were applied: ``groups`` holds how many per key group."""
        per_group = self.counts.setdefault(src.rsplit("/", 1)[0], {})
        for group, n in groups.items():
            g = str(group)
            per_group[g] = per_group.get(g, 0) + n

    def end_of_stream(self, body: dict[str, Any]) -> None:
        """Take an end-of-stream control body.

        Raises:
            MalformedMessage: ``from`` is not a string or ``sent`` not counts per key group.
        """
        source, sent = body.get("from"), body.get("sent", {})
        if (
            not isinstance(source, str)
            or not isinstance(sent, dict)
            or not all(_group_key(g) and type(n) is int and n >= 0 for g, n in sent.items())
        ):
            raise MalformedMessage(
                "malformed message: end-of-stream needs 'from' (a string) and 'sent' (counts per key group), "
                f"got from={source!r:.40}, sent={sent!r:.60}"
            )
        self.eos[source] = dict(sent)

    def complete(self) -> bool:
        """True once every upstream replica ended and every record it sent to this replica's groups was applied."""
        if not self.expected or not self.expected <= set(self.eos):
            return False
        assert self.stage is not None
        for up in self.plan.stages[self.stage].upstream:
            got = self.counts.get(up, {})
            senders = [self.eos[f"{up}/{i}"] for i in range(self.plan.stages[up].parallelism)]
            for g in self.owned:
                if got.get(g, 0) < sum(sent.get(g, 0) for sent in senders):
                    return False
        return True

    def restore(self, meta: dict[str, Any]) -> None:
        self.counts = {up: dict(per) for up, per in meta.get("counts", {}).items() if isinstance(per, dict)}
        self.eos = {src: dict(sent) for src, sent in meta.get("eos", {}).items() if isinstance(sent, dict)}


def _group_key(g: Any) -> bool:
    return isinstance(g, str) and g.isdigit() and int(g) < KEY_GROUPS

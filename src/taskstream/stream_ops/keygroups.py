"""Key groups: keys hash to a fixed number of groups, and the replicas of a stage own the groups in ranges.

A keyed item goes to the replica that owns its key's group: ``group = crc32(key) % KEY_GROUPS`` and replica ``i``
of ``n`` owns groups ``[i * KEY_GROUPS // n, (i + 1) * KEY_GROUPS // n)``. Unkeyed items are given groups in
turn (round robin). The number of groups never changes, so when a stage's parallelism changes, whole groups
move to new owners: their window state, their end-of-stream accounting and their queued records
(:mod:`~taskstream.stream_ops.rescale`).

Example:
    >>> owner(group_of("s1"), 3) in range(3)
    True
    >>> [len(groups_of(i, 3)) for i in range(3)]
    [43, 43, 42]
"""

from __future__ import annotations

import zlib

__all__ = ["KEY_GROUPS", "group_of", "groups_of", "owner"]

KEY_GROUPS = 128


def group_of(key: str) -> int:
    """The key group of ``key``."""
    return zlib.crc32(key.encode()) % KEY_GROUPS


def owner(group: int, replicas: int) -> int:
    """The replica (of ``replicas``) that owns ``group``."""
    return (group * replicas) // KEY_GROUPS


def groups_of(replica: int, replicas: int) -> range:
    """The groups replica ``replica`` of ``replicas`` owns (a contiguous range)."""
    first = -(-replica * KEY_GROUPS // replicas)
    last = -(-(replica + 1) * KEY_GROUPS // replicas)
    return range(first, last)

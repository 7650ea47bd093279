"""Queue names unique to a test run, so two runs on one shared broker never meet."""

from __future__ import annotations

import uuid

__all__ = ["unique"]


def unique(prefix: str) -> str:
    """``prefix`` with a random suffix: ``orders`` -> ``orders-3f9c0a12b4``."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"

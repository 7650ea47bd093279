"""What a test does when a server or tool it needs cannot run here.

Locally it skips with the reason (``pytest -rs`` prints it). Where every claim must be proven (``.ci/run`` sets
``TASKSTREAM_TEST_REQUIRE_ALL=1``) it fails instead, so a missing server or tool can never pass as a skip.
Skips for what a backend does not offer (``Capabilities``) are not this: they stay skips everywhere.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["REQUIRE_ALL", "required", "unavailable"]

REQUIRE_ALL = "TASKSTREAM_TEST_REQUIRE_ALL"


def required() -> bool:
    """Whether a missing server or tool fails the run (``TASKSTREAM_TEST_REQUIRE_ALL`` or ``CI`` set)."""
    return bool(os.environ.get(REQUIRE_ALL) or os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``, or fail with it where every claim is required."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ALL} is set: a missing server or tool is a failure here)", pytrace=False)
    pytest.skip(reason)

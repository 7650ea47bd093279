"""Shared pytest configuration.

No test touches the user's home: the default result store (``$XDG_CACHE_HOME/taskstream/results.sqlite3``) and
anything else under the cache directory go to a directory of this run, removed at its end. Child processes
inherit it through the environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_KEY = "_taskstream_test_cache"


def pytest_configure(config: pytest.Config) -> None:
    cache = tempfile.mkdtemp(prefix="taskstream-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    setattr(config, _CACHE_KEY, cache)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = getattr(config, _CACHE_KEY, None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)

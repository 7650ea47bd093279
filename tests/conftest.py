"""Shared pytest configuration.

No test touches the user's home: the default result store (``$XDG_CACHE_HOME/taskstream/results.sqlite3``), the
default payload directory and anything else under the cache directory go to a directory of this run, removed
at its end; child processes inherit it through the environment. A run that changed the user's own
``~/.cache/taskstream`` anyway fails at its end, naming the files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HOME_CACHE = Path.home() / ".cache" / "taskstream"
_state: dict[str, object] = {}


def _snapshot(directory: Path) -> dict[str, float]:
    """The files under ``directory`` with their modification times (empty when it does not exist)."""
    if not directory.is_dir():
        return {}
    found: dict[str, float] = {}
    for path in directory.rglob("*"):
        try:
            found[str(path)] = path.stat().st_mtime
        except OSError:  # removed while we walked
            continue
    return found


def pytest_configure(config: pytest.Config) -> None:
    cache = tempfile.mkdtemp(prefix="taskstream-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = cache
    _state["cache"] = cache
    _state["home"] = _snapshot(_HOME_CACHE)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = _state.get("home")
    if not isinstance(before, dict):
        return
    after = _snapshot(_HOME_CACHE)
    changed = sorted(p for p, mtime in after.items() if before.get(p) != mtime and not Path(p).is_dir())
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"tests wrote the user's home, which they must not: {changed[:10]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = _state.get("cache")
    if isinstance(cache, str):
        shutil.rmtree(cache, ignore_errors=True)

"""The "Task futures" section of ``taskstream demo``."""

from __future__ import annotations

import pytest

from taskstream.demo import SECTIONS
from taskstream.tasks.demo_section import tasks_section


@pytest.mark.memory
async def test_task_futures_demo_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert ("Task futures", tasks_section) in SECTIONS
    await tasks_section("memory://")
    out = capsys.readouterr().out
    assert "mean of the estimates (a dataflow edge over 8 futures): 3.1" in out
    assert "from the result store: success" in out
    assert "ZeroDivisionError: float division by zero (in task calibrate)" in out
    assert "return reading / factor" in out  # the remote traceback points at the user's line
    assert "DependencyFailed: task mean did not run" in out

"""Interpreter exit stops an App that started itself, silently (no traceback, no pending-task warnings)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import taskstream

    app = taskstream.App()

    @app.task(cpu_bound=True)
    def square(n: int) -> int:
        return n * n

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    if __name__ == "__main__":
        print("result", add.submit(square.submit(7), 1).result(timeout=60), flush=True)
    """
)


@pytest.mark.memory
def test_a_script_using_cpu_bound_tasks_without_with_app_exits_silently(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "result 50"
    assert "Traceback" not in done.stderr
    assert "Exception ignored" not in done.stderr
    assert "Task was destroyed" not in done.stderr
    assert done.stderr.strip() == ""

"""One intake path: the dead-letter reason is written in one module, and there is one retry policy."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
#: a header written: a dict key (``"x-death-reason": ...``) or an item assignment (``h["x-death-reason"] = ...``)
WRITTEN = re.compile(r"""["']x-death-reason["']\s*(:|\]\s*=)""")


@pytest.mark.skipif(shutil.which("grep") is None, reason="needs grep")
def test_grep_finds_x_death_reason_written_in_the_intake_only() -> None:
    found = subprocess.run(
        ["grep", "-rn", "--include=*.py", "x-death-reason", "src/"],
        cwd=SRC.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    writers = {line.split(":", 1)[0] for line in found if WRITTEN.search(line.split(":", 2)[2])}
    assert writers == {"src/taskstream/intake.py"}, found


def test_one_retry_policy_class() -> None:
    classes = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and node.name == "RetryPolicy"
    ]
    assert len(classes) == 1 and classes[0].startswith("taskstream/intake.py:"), classes

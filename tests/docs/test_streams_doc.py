"""The Python blocks of docs/streams.md run as they stand, on the memory broker, and print what they say.

Each ```python block runs in a fresh namespace in a temporary working directory (a block whose first line is
``# not run`` is skipped). A line ``print(...)  # text`` in a block promises that ``text`` appears in what the
block prints.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "streams.md"
FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.S | re.M)
PROMISE = re.compile(r"^\s*print\(.*\)\s+# (.+?)\s*$")
ENV = ("TASKSTREAM_BROKER_URL", "TASKSTREAM_STATE_URL", "TASKSTREAM_PAYLOAD_STORE_URL", "TASKSTREAM_PAYLOAD_THRESHOLD")


def python_blocks() -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` for every runnable block of the guide."""
    text = DOC.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        code = match.group(1)
        if code.lstrip().startswith("# not run"):
            continue
        blocks.append((text.count("\n", 0, match.start(1)) + 1, code))
    return blocks


BLOCKS = python_blocks()


def promises(code: str) -> list[str]:
    return [m.group(1) for line in code.splitlines() if (m := PROMISE.match(line))]


def test_the_guide_has_its_examples_and_its_picture() -> None:
    assert len(BLOCKS) >= 10, "the ```python blocks of docs/streams.md were not found"
    assert sum(len(promises(code)) for _, code in BLOCKS) >= 10
    text = DOC.read_text(encoding="utf-8")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (DOC.parent / image).is_file(), f"docs/streams.md shows {image}, which does not exist"
    assert "img/sensor_windows.svg" in text


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"line-{line}" for line, _ in BLOCKS])
def test_python_block_runs_and_prints_what_it_says(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TASKSTREAM_BROKER_URL", "memory://")
    monkeypatch.setenv("TASKSTREAM_STATE_URL", "memory://")
    monkeypatch.setenv("TASKSTREAM_PAYLOAD_STORE_URL", (tmp_path / "payloads").as_uri())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{DOC}:{line}", "exec"), {"__name__": f"streams_doc_line_{line}"})
    out = printed.getvalue()
    for promise in promises(code):
        assert promise in out, f"docs/streams.md:{line} promised {promise!r}; the block printed:\n{out}"

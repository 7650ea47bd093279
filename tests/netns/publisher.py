"""``python -m tests.netns.publisher URL QUEUE COUNT OUT``: publish with confirms from inside a namespace.

Writes the confirmed numbers (a JSON list) to ``OUT`` when done.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.cluster.traffic import ROOT, publish_confirmed


def spawn(prefix: Sequence[str], url: str, queue: str, count: int, workdir: Path) -> subprocess.Popen[bytes]:
    """Start the publisher under ``prefix`` (``ip netns exec NS``); it writes ``workdir/published.json``."""
    command = [*prefix, sys.executable, "-m", "tests.netns.publisher", url, queue, str(count)]
    with (workdir / "publisher.err").open("wb") as errors:
        return subprocess.Popen(
            [*command, str(workdir / "published.json")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors
        )


def main() -> None:
    url, queue, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    confirmed, failures = asyncio.run(publish_confirmed(url, queue, count))
    out.write_text(json.dumps({"confirmed": confirmed, "failures": failures}), encoding="utf-8")


if __name__ == "__main__":
    main()

"""``taskstream payloads ls`` and ``expire`` against a local store."""

from __future__ import annotations

import os
import time
from pathlib import Path

from typer.testing import CliRunner

from taskstream.cli import _register_extensions, cli


def test_ls_and_expire(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    (store_dir / "20250101").mkdir(parents=True)
    old, new = store_dir / "20250101" / "old.tsb", store_dir / "20250101" / "new.tsb"
    old.write_bytes(b"o" * 10)
    new.write_bytes(b"n" * 20)
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    _register_extensions()
    runner = CliRunner()
    url = f"file://{store_dir}"
    listed = runner.invoke(cli, ["payloads", "ls", "--store", url])
    assert listed.exit_code == 0, listed.output
    assert "20250101/old.tsb\t10" in listed.output and "20250101/new.tsb\t20" in listed.output
    expired = runner.invoke(cli, ["payloads", "expire", "--store", url])  # default TTL: 7 days
    assert expired.exit_code == 0, expired.output
    assert "expired 1 payload(s)" in expired.output
    assert not old.exists() and new.exists()
    assert "expired 1" in runner.invoke(cli, ["payloads", "expire", "--store", url, "--older-than", "0"]).output
    assert not new.exists()

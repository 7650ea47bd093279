"""Shared helpers of the deployment tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.require import unavailable

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the venv running the tests


def require_tool(name: str) -> str:
    """The path of an OS tool installed by scripts/services/deploy-tools.sh (see :mod:`tests.support.require`)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed: run scripts/services/deploy-tools.sh (as root)")
    return path


def venv_tool(name: str) -> str:
    """A console script of the project's venv (check-jsonschema, kubernetes-validate, taskstream)."""
    for candidate in (VENV_BIN / name, Path(shutil.which(name) or "/nonexistent")):
        if candidate.exists():
            return str(candidate)
    pytest.fail(f"{name} is missing from the venv: pip install -e '.[dev]'")

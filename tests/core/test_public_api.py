"""The public surface is explicit: every name in __all__ exists, and __all__ is sorted."""

from __future__ import annotations

import importlib

import pytest

import taskstream

MODULES = ["taskstream", "taskstream.errors", "taskstream.messages", "taskstream.brokers", "taskstream.consumer"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


def test_every_error_derives_from_the_root() -> None:
    from taskstream import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, taskstream.TaskstreamError), name

"""broker_from_url: schemes, typos, missing extras, secrets kept out of errors."""

from __future__ import annotations

import builtins
from typing import Any

import pytest

from taskstream.brokers.base import broker_from_url, topic_matches
from taskstream.brokers.memory import MemoryBroker
from taskstream.errors import ConfigurationError, MissingExtraError
from taskstream.settings import redact_url


def test_memory_url_with_options() -> None:
    broker = broker_from_url("memory://hub-a?visibility_timeout=5&max_message_bytes=1000")
    assert isinstance(broker, MemoryBroker)
    assert broker.capabilities.visibility_timeout == 5.0
    assert broker.capabilities.max_message_bytes == 1000


@pytest.mark.parametrize(
    ("url", "named", "suggested"),
    [
        (
            "memory://hub-b?visibilty_timeout=5",
            "unknown memory broker URL parameter 'visibilty_timeout'",
            "visibility_timeout",
        ),
        ("amqp://guest:hunter2@127.0.0.1/?wait_time=5", "unknown RabbitMQ URL parameter 'wait_time'", None),
        (
            "amqp://guest:hunter2@127.0.0.1/?queue_typ=quorum",
            "unknown RabbitMQ URL parameter 'queue_typ'",
            "queue_type",
        ),
        ("sqs://us-east-1/?wiat_time=5", "unknown SQS URL parameter 'wiat_time'", "wait_time"),
        ("azurequeue://devstorage?pol_interval=1", "unknown Azure queue URL parameter 'pol_interval'", "poll_interval"),
        ("zmq://127.0.0.1:5555?hearbeat=1", "unknown zmq URL parameter 'hearbeat'", "heartbeat"),
    ],
)
def test_every_backend_refuses_an_unknown_option_by_name_with_the_url(
    url: str, named: str, suggested: str | None
) -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url(url)
    message = str(info.value)
    assert named in message
    assert f"in {redact_url(url)!r}" in message and "hunter2" not in message
    if suggested is not None:
        assert f"(did you mean {suggested!r}?)" in message


def test_memory_option_values_are_typed() -> None:
    broker = broker_from_url("memory://?visibility_timeout=500ms")
    assert broker.capabilities.visibility_timeout == 0.5
    with pytest.raises(ConfigurationError, match=r"max_message_bytes='lots' is not a valid value"):
        broker_from_url("memory://?max_message_bytes=lots")


def test_unknown_scheme_suggests_the_closest_one_and_hides_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url("amqq://guest:hunter2@localhost/")
    assert "did you mean amqp://" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "zmq" or name.startswith("zmq."):
            raise ImportError("No module named 'zmq'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(__import__("sys").modules, "zmq", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'taskstream\[zmq\]'"):
        broker_from_url("zmq://127.0.0.1:5555")


def test_redact_url_hides_passwords_and_keys() -> None:
    assert redact_url("amqp://guest:s3cret@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    redacted = redact_url("azurequeue://acct?AccountKey=abc123&visibility_timeout=1")
    assert "abc123" not in redacted and "visibility_timeout=1" in redacted


@pytest.mark.parametrize(
    ("pattern", "topic", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "ab", False),
        ("#", "anything", True),
    ],
)
def test_topic_patterns(pattern: str, topic: str, matches: bool) -> None:
    assert topic_matches(pattern, topic) is matches

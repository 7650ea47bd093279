"""The URL-options parser the backends share: kinds, overrides, unknown names, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskstream.brokers.azure_queues import OPTIONS as AZURE_OPTIONS
from taskstream.brokers.base import broker_from_url
from taskstream.brokers.sqs import OPTIONS as SQS_OPTIONS
from taskstream.brokers.sqs import SQSBroker
from taskstream.errors import ConfigurationError
from taskstream.settings import DEFAULT_MAX_ATTEMPTS, Settings, redact_url
from taskstream.urloptions import Option, URLOptions, parse_bool, parse_duration, split_query

DEMO = URLOptions(
    "demo",
    [
        Option("wait", "duration", 20.0, "long-poll seconds"),
        Option("create", "bool", True, "create missing queues"),
        Option("batch", "int", 10, "messages per call"),
        Option("ratio", "float", 0.5, "a fraction"),
        Option("token", "str", None, "a secret", secret=True),
        Option("credential", "any", None, "an object in code, text in the URL"),
    ],
)


def test_values_are_converted_by_kind_and_overrides_win() -> None:
    values = DEMO.parse("wait=2m&create=OFF&batch=7&ratio=0.25&token=a+b%2Fc", {"batch": 3, "credential": object})
    assert values == {"wait": 120.0, "create": False, "batch": 3, "ratio": 0.25, "token": "a+b/c", "credential": object}
    assert DEMO.parse("") == {}
    assert DEMO.parse("wait=&batch=4", {"create": None}) == {"batch": 4}  # blank and None count as not given
    assert DEMO.defaults()["wait"] == 20.0
    assert "| `wait` | duration | `20.0` | long-poll seconds |" in DEMO.table()


def test_kinds_accept_their_spellings_and_refuse_others() -> None:
    assert [parse_bool(v) for v in ("1", "Yes", "on", "TRUE", "0", "no", "Off", "false")] == [True] * 4 + [False] * 4
    assert [parse_duration(v) for v in ("30", "2.5", "30s", "500ms", "2m", "1h")] == [30, 2.5, 30, 0.5, 120, 3600]
    for bad in ("maybe", ""):
        with pytest.raises(ValueError):
            parse_bool(bad)
    for bad in ("soon", "5 days", "-1"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert split_query("a=1&b=2&a=3&c=") == {"a": "3", "b": "2"}


def test_unknown_options_are_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown demo URL parameter 'wiat' \(did you mean 'wait'\?\)"):
        DEMO.parse("wiat=3")
    with pytest.raises(ConfigurationError) as info:
        DEMO.parse("zzz=1&creat=1")
    assert "'creat' (did you mean 'create'?)" in str(info.value) and "'zzz'" in str(info.value)
    assert "known: batch, create, credential, ratio, token, wait" in str(info.value)


def test_bad_values_say_what_was_expected_and_hide_secrets() -> None:
    with pytest.raises(ConfigurationError, match=r"demo URL parameter batch='ten' is not a valid value.*whole number"):
        DEMO.parse("batch=ten")
    with pytest.raises(ConfigurationError, match="true or false"):
        DEMO.parse("create=perhaps")
    secret = URLOptions("demo", [Option("port", "int", 1, "a secret number", secret=True)])
    with pytest.raises(ConfigurationError) as info:
        secret.parse("port=hunter2")
    assert "hunter2" not in str(info.value) and "port=***" in str(info.value)
    with pytest.raises(ValueError, match="twice"):
        URLOptions("demo", [Option("a", "int", 1, ""), Option("a", "int", 2, "")])


def test_backends_declare_their_options_once() -> None:
    assert "visibility_timeout" in {option.name for option in SQS_OPTIONS}
    assert AZURE_OPTIONS.options["connection_string"].secret
    broker = SQSBroker.from_url("sqs://us-east-1/?visibility_timeout=90s&close_grace=500ms&create_queues=no")
    assert (broker.options.visibility_timeout, broker.options.close_grace) == (90.0, 0.5)
    assert broker.options.create_queues is False
    with pytest.raises(ConfigurationError, match="did you mean 'poll_interval'"):
        broker_from_url("azurequeue://devstorage?pol_interval=1")


def test_settings_are_passed_to_the_backend_never_read_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKSTREAM_MAX_ATTEMPTS", "11")  # the backend must not read it by itself
    plain = broker_from_url("sqs://us-east-1/")
    assert isinstance(plain, SQSBroker)
    assert plain.redrive_count == DEFAULT_MAX_ATTEMPTS
    given = broker_from_url("sqs://us-east-1/", settings=Settings(max_attempts=3))
    assert isinstance(given, SQSBroker)
    assert given.redrive_count == 3
    explicit = broker_from_url("sqs://us-east-1/?max_receive_count=8", settings=Settings(max_attempts=3))
    assert isinstance(explicit, SQSBroker)
    assert explicit.redrive_count == 8
    assert broker_from_url("memory://", settings=Settings()).capabilities.name == "memory"  # takes no settings


def test_rabbitmq_refuses_unknown_options_and_passes_the_drivers_own() -> None:
    from taskstream.brokers.rabbitmq.config import parse_url

    with pytest.raises(ConfigurationError) as info:
        broker_from_url("amqp://guest:hunter2@127.0.0.1/?wait_time=5")
    message = str(info.value)
    assert "unknown RabbitMQ URL parameter 'wait_time'" in message and "amqp://guest:***@127.0.0.1/" in message
    assert "hunter2" not in message
    with pytest.raises(ConfigurationError, match=r"'heartbeet' \(did you mean 'heartbeat'\?\)"):
        broker_from_url("amqp://guest:guest@127.0.0.1/?heartbeet=5")
    driver_url, config = parse_url(
        "amqp://u:p@h1,h2/v?heartbeat=5&name=worker%201&publish_timeout=2s&cafile=/etc/ca.pem&fail_fast=0", {}
    )
    assert config.publish_timeout == 2.0
    assert driver_url == (
        "amqp://u:p@h1,h2/v?heartbeat=5&name=worker%201&cafile=%2Fetc%2Fca.pem&fail_fast=0&reconnect_interval=1.0"
    )


@pytest.mark.parametrize(
    ("build", "url", "named", "suggested"),
    [
        ("result", "memory://results?ttl=5", "unknown memory result store URL parameter 'ttl'", None),
        ("result", "sqlite:///r.db?synchronus=full", "unknown SQLite result store URL parameter", "synchronous"),
        ("result", "redis://:hunter2@127.0.0.1:6379/0?socket_timout=5", "unknown Redis result store", "socket_timeout"),
        ("state", "sqlite:///s.db?journal=wal", "unknown SQLite state store URL parameter 'journal'", None),
        ("state", "memory://?size=3", "unknown memory state store URL parameter 'size'", None),
        ("state", "redis://:hunter2@127.0.0.1:6379/0?db_=1", "unknown Redis state store URL parameter 'db_'", "db"),
    ],
)
def test_result_and_state_stores_refuse_unknown_options(
    build: str, url: str, named: str, suggested: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskstream.stream_ops.state import state_store_from_url
    from taskstream.tasks.stores.base import result_store_from_url

    monkeypatch.chdir(tmp_path)  # relative SQLite files, if one were made, land here
    with pytest.raises(ConfigurationError) as info:
        result_store_from_url(url) if build == "result" else state_store_from_url(url)
    message = str(info.value)
    assert named in message and f"in {redact_url(url)!r}" in message and "hunter2" not in message
    if suggested is not None:
        assert f"(did you mean {suggested!r}?)" in message
    assert not list(tmp_path.iterdir())


def test_redis_urls_keep_the_options_redis_py_reads() -> None:
    from taskstream.redis_url import check_redis_url

    check_redis_url("rediss://h:6380/2?socket_timeout=5&ssl_cert_reqs=none&health_check_interval=10", "Redis store")
    with pytest.raises(ConfigurationError, match=r"'socket_timout' \(did you mean 'socket_timeout'\?\)"):
        check_redis_url("redis://h/0?socket_timout=5", "Redis store")


@pytest.mark.rabbitmq
async def test_rabbitmq_connects_with_the_drivers_own_options() -> None:
    import os
    import uuid

    from taskstream.brokers.rabbitmq import RabbitMQBroker

    base = os.environ.get("TASKSTREAM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    url = f"{base}?heartbeat=7&name=taskstream%20options%20test&timeout=10&fail_fast=1&connect_timeout=5s"
    broker = RabbitMQBroker.from_url(url)
    queue = f"ts-test-options-{uuid.uuid4().hex[:8]}"
    async with broker:
        await broker.declare(queue)
        try:
            await broker.publish(queue, b"hello", headers={}, message_id="m1")
            async with broker.consume(queue, prefetch=1) as subscription:
                delivery = await anext(subscription)
                assert delivery.body == b"hello"
                await delivery.ack()
        finally:
            await broker.delete_queue(queue)

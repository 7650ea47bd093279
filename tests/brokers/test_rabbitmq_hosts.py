"""Several RabbitMQ hosts in one URL: parsing, failover on the first connect and on reconnect, redaction.

The two "hosts" are TCP proxies in front of the one RabbitMQ on 127.0.0.1:5672 (the server is never stopped);
taking a proxy down is, to the client, losing that host. Killing real cluster nodes is ``tests/cluster/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from taskstream.brokers.rabbitmq import RabbitMQBroker
from taskstream.brokers.rabbitmq.config import parse_url, split_hosts
from taskstream.errors import BrokerConnectionError, ConfigurationError
from tests.brokers.test_rabbitmq import HOST, PORT, URL
from tests.support.names import unique
from tests.support.ports import free_port
from tests.support.proxy import TcpProxy

# The test server's credentials (TASKSTREAM_TEST_AMQP_URL, or guest/guest); a URL shown in logs or errors must
# not contain the password after ':'.
USER = urlsplit(URL).username or "guest"
SECRET = urlsplit(URL).password or "guest"


def test_split_hosts_keeps_credentials_vhost_and_options() -> None:
    driver_url, config = parse_url("amqp://u:p%40ss@h1:5672,h2:5673,[::1]:5674/vh?queue_type=quorum&heartbeat=5", {})
    assert config.queue_type == "quorum"
    assert split_hosts(driver_url) == [
        "amqp://u:p%40ss@h1:5672/vh?heartbeat=5&reconnect_interval=1.0",
        "amqp://u:p%40ss@h2:5673/vh?heartbeat=5&reconnect_interval=1.0",
        "amqp://u:p%40ss@[::1]:5674/vh?heartbeat=5&reconnect_interval=1.0",
    ]
    assert split_hosts("amqp://u:p@h1/") == ["amqp://u:p@h1/"]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://u:hunter2@h1:5672,,h3:5672/", "host 2 of 3 in the host list is empty"),
        ("amqp://u:hunter2@h1:5672,h2:99999/", "port '99999' of host 'h2'"),
        ("amqp://u:hunter2@h1:56x2/", "port '56x2' of host 'h1'"),
    ],
)
def test_bad_host_list_says_what_is_wrong_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match="bad RabbitMQ URL") as caught:
        RabbitMQBroker.from_url(url)
    assert problem in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "u:***@" in str(caught.value)


@pytest.fixture
async def proxies() -> AsyncIterator[list[TcpProxy]]:
    made = [TcpProxy(PORT, HOST), TcpProxy(PORT, HOST)]
    for proxy in made:
        await proxy.up()
    yield made
    for proxy in made:
        await proxy.stop()


@pytest.fixture
async def queues() -> AsyncIterator[list[str]]:
    """Names a test appends; deleted afterwards over a direct connection (the test's own may be broken)."""
    names: list[str] = []
    yield names
    if names:
        async with RabbitMQBroker.from_url(URL) as cleaner:
            for name in names:
                with contextlib.suppress(Exception):
                    await cleaner.delete_queue(name)


def url_of(*ports: int, query: str = "", host: str = "127.0.0.1") -> str:
    """A URL listing ``ports`` as hosts (the last on ``host``: the real server when it is given its port)."""
    hosts = [f"127.0.0.1:{p}" for p in ports[:-1]] + [f"{host}:{ports[-1]}"]
    return f"amqp://{USER}:{SECRET}@" + ",".join(hosts) + "/" + query


@pytest.mark.rabbitmq
async def test_first_connect_skips_hosts_that_do_not_answer(
    caplog: pytest.LogCaptureFixture, queues: list[str]
) -> None:
    dead = free_port()
    broker = RabbitMQBroker.from_url(url_of(dead, PORT, host=HOST))
    queue = unique("hosts.first")
    queues.append(queue)
    with caplog.at_level(logging.WARNING, logger="taskstream.brokers.rabbitmq"):
        async with broker:
            await broker.declare(queue)
            await broker.publish(queue, b'{"n": 1}')
            assert await broker.depth(queue) == 1
    shown = [r.getMessage() for r in caplog.records if f"127.0.0.1:{dead}" in r.getMessage()]
    assert shown, "the host that did not answer is named in a warning"
    assert all(f":{SECRET}@" not in line and f"{USER}:***@" in line for line in shown)


@pytest.mark.rabbitmq
async def test_no_host_answers_names_every_host_and_hides_the_password() -> None:
    first, second = free_port(), free_port()
    broker = RabbitMQBroker.from_url(url_of(first, second, query="?connect_timeout=2"))
    with pytest.raises(BrokerConnectionError, match="cannot connect to any of the 2 RabbitMQ hosts") as caught:
        await broker.connect()
    text = str(caught.value)
    assert f"127.0.0.1:{first}" in text and f"127.0.0.1:{second}" in text
    assert f":{SECRET}@" not in text
    await broker.close()


@pytest.mark.rabbitmq
async def test_reconnect_moves_to_the_next_host_and_resumes_the_consumer(
    proxies: list[TcpProxy], queues: list[str]
) -> None:
    first, second = proxies
    queue = unique("hosts.failover")
    queues.append(queue)
    broker = RabbitMQBroker.from_url(url_of(first.port, second.port, query="?reconnect_interval=0.2"))
    async with broker:
        await broker.declare(queue)
        subscription = broker.consume(queue, prefetch=10)
        await broker.publish(queue, b'{"n": 1}')
        async with asyncio.timeout(30):
            delivery = await anext(subscription)
            await delivery.ack()
            await first.down()  # the first host is gone for good: the next attempts must go to the second
            await broker.publish(queue, b'{"n": 2}')  # waits for the reconnect, then is confirmed
            bodies = []
            while b'{"n": 2}' not in bodies:  # 1 may come again: its ack may have been lost with the host
                delivery = await anext(subscription)
                bodies.append(delivery.body)
                await delivery.ack()
            assert set(bodies) <= {b'{"n": 1}', b'{"n": 2}'}
        await subscription.close()

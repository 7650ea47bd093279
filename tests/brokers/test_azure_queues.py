"""Azure Storage Queues specifics, on Azurite: crash safety, poison queue, encoded size, encoding, polling, URLs.

The shared semantics are in the contract suite (``pytest tests/brokers/contract -m azure``); these tests cover
what is particular to Azure.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.queue.aio import QueueClient

from taskstream.brokers.azure_queues import (
    AZURE_MAX_MESSAGE_TEXT,
    MIN_POLL_DELAY,
    AzureQueueBroker,
    AzureQueueSubscription,
    azure_queue_name,
)
from taskstream.brokers.base import OutgoingMessage, broker_from_url
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import BrokerConnectionError, ConfigurationError, MessageTooLarge, QueueNotFound
from taskstream.messages import Envelope
from taskstream.producer import Producer, broker_headers
from tests.brokers.contract.backends.azure import setup as azurite_up
from tests.brokers.contract.conftest import receive, receive_none
from tests.support.waiting import wait_for

pytestmark = pytest.mark.azure

DEV = "UseDevelopmentStorage=true"
# Azurite's published development key (not a secret).
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEV_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    f"AccountKey={DEV_KEY};QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
)


class Azure:
    """Per-test helper: connected brokers, unique queues, raw SDK clients; deletes the queues afterwards."""

    def __init__(self) -> None:
        self.brokers: list[AzureQueueBroker] = []
        self.queues: list[str] = []
        self.raw: list[QueueClient] = []

    async def broker(self, url: str = "azurequeue://devstorage", **options: Any) -> AzureQueueBroker:
        broker = AzureQueueBroker.from_url(url, **options)
        await broker.connect()
        self.brokers.append(broker)
        return broker

    async def queue(self, broker: AzureQueueBroker, stem: str = "az") -> str:
        name = azure_queue_name(f"{stem}-{uuid.uuid4().hex[:12]}")
        await broker.declare(name)
        self.queues += [name, broker.dead_letter_name(name)]
        return name

    def raw_client(self, queue: str) -> QueueClient:
        client = QueueClient.from_connection_string(DEV, queue)
        self.raw.append(client)
        return client

    async def close(self) -> None:
        for client in self.raw:
            await client.close()
        cleaner = AzureQueueBroker.from_url("azurequeue://devstorage")
        async with cleaner:
            for queue in self.queues:
                try:
                    await cleaner.delete_queue(queue)
                except Exception:
                    pass
        for broker in self.brokers:
            await broker.close()


@pytest.fixture
async def az() -> AsyncIterator[Azure]:
    await azurite_up()
    helper = Azure()
    try:
        yield helper
    finally:
        await helper.close()


# -- crash safety ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from taskstream.brokers.azure_queues import AzureQueueBroker
    from taskstream.consumer import Consumer, ConsumerConfig

    async def main(queue: str, count: int) -> None:
        broker = AzureQueueBroker.from_url("azurequeue://devstorage", visibility_timeout=3)
        await broker.connect()
        held = []

        async def hold(message):
            held.append(message.envelope.body)
            if len(held) == count:
                print(f"HOLDING {len(set(held))}", flush=True)
            await asyncio.Event().wait()  # never finishes, never acks

        consumer = Consumer(broker, queue, hold, ConsumerConfig(prefetch=count, concurrency=count))
        await consumer.start()
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_consumer_killed_with_sigkill_while_holding_50_messages_loses_none(az: Azure) -> None:
    broker = await az.broker(visibility_timeout=3)
    queue = await az.queue(broker, "crash")
    await Producer(broker).send_many(queue, [Envelope(body=i) for i in range(50)])

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, queue, "50", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
        except TimeoutError:
            pytest.fail("the holding consumer never received its 50 messages")
        assert line.decode().strip() == "HOLDING 50", line
        # Held, not deleted: every message is still in the queue (invisible) while the process lives.
        assert await broker.depth(queue) == 50
    finally:
        if child.returncode is None:
            os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    processed: dict[int, list[int]] = collections.defaultdict(list)

    async def handle(message: Message) -> None:
        processed[message.envelope.body].append(message.delivery.attempt)

    survivor = Consumer(broker, queue, handle, ConsumerConfig(prefetch=32, concurrency=16))
    await survivor.start()
    await wait_for(lambda: len(processed) == 50, what="the 50 messages of the killed consumer")
    await survivor.stop()
    assert sorted(processed) == list(range(50))
    first_attempts = {body: attempts[0] for body, attempts in processed.items()}
    assert all(a >= 2 for a in first_attempts.values()), f"not delivered to the killed consumer first: {first_attempts}"
    await wait_for(lambda: survivor.stats.acked >= 50, what="acks")
    assert await broker.depth(queue) == 0


async def test_close_returns_buffered_and_unsettled_messages_at_once(az: Azure) -> None:
    broker = await az.broker(visibility_timeout=60)
    queue = await az.queue(broker)
    await broker.publish_batch(queue, [OutgoingMessage(str(i).encode()) for i in range(5)])
    sub = broker.consume(queue, prefetch=5)
    await receive(sub, 2)  # 2 handed out, up to 3 more received into the buffer
    await sub.close()
    other = await az.broker(visibility_timeout=60)
    async with other.consume(queue, prefetch=5) as again:
        # Far sooner than the 60 s visibility timeout: close() made them visible again.
        got = await receive(again, 5, timeout=20)
        assert sorted(int(d.body) for d in got) == [0, 1, 2, 3, 4]
        for d in got:
            await d.ack()


async def test_extend_keeps_the_newest_pop_receipt(az: Azure, caplog: pytest.LogCaptureFixture) -> None:
    broker = await az.broker(visibility_timeout=2)
    queue = await az.queue(broker)
    await broker.publish(queue, b"long job")
    async with broker.consume(queue, prefetch=1) as sub:
        [d] = await receive(sub, 1)
        with caplog.at_level(logging.WARNING, logger="taskstream.brokers.azure"):
            for _ in range(3):
                await d.extend(2)  # each update changes the pop receipt
            await d.ack()  # must use the newest one
        assert not [r for r in caplog.records if "failed" in r.getMessage()], caplog.text
        await receive_none(sub, 3.0)  # gone for good, even after the visibility timeout
    assert await broker.depth(queue) == 0


async def test_buffered_messages_stay_invisible_until_handed_out(az: Azure) -> None:
    # 3 s visibility: the keep-alive renews every second with 2 s to spare, so a slow Azurite cannot beat it.
    broker = await az.broker(visibility_timeout=3)
    rival = await az.broker(visibility_timeout=3, poll_interval=0.2)  # polls often: a lapse would show at once
    queue = await az.queue(broker)
    await broker.publish_batch(queue, [OutgoingMessage(b"first"), OutgoingMessage(b"second")])
    async with broker.consume(queue, prefetch=2) as sub:
        assert isinstance(sub, AzureQueueSubscription)
        [first] = await receive(sub, 1)
        await first.ack()
        await wait_for(lambda: sub.buffered == 1, what="the second message in the buffer")
        async with rival.consume(queue, prefetch=2) as other:
            await receive_none(other, 4.5)  # 1.5 visibility timeouts: the buffer kept it hidden
        [second] = await receive(sub, 1)
        assert {first.body, second.body} == {b"first", b"second"}  # concurrent sends: either order
        assert second.attempt == 1
        await second.ack()


async def test_a_queue_deleted_under_a_consumer_fails_it_clearly(az: Azure) -> None:
    broker = await az.broker()
    queue = await az.queue(broker)
    async with broker.consume(queue, prefetch=2) as sub:
        assert isinstance(sub, AzureQueueSubscription)
        await wait_for(lambda: sub.polls >= 1, what="the consumer's first receive")
        await az.raw_client(queue).delete_queue()
        with pytest.raises(QueueNotFound, match=queue):
            await receive(sub, 1)


DELAY = 3.0


async def absent_until(sub: AzureQueueSubscription, start: float) -> None:
    """Nothing delivered until shortly before a ``DELAY`` counted from ``start`` is due (80 % of it)."""
    await receive_none(sub, max(0.0, start + 0.8 * DELAY - time.monotonic()))


async def test_publish_and_nack_delays_hide_the_message_until_they_pass(az: Azure) -> None:
    # Both delays run at once (two queues): the test takes one delay, not two. Polling every 0.1 s at most, a
    # message due early is received before the absence check ends.
    broker = await az.broker(poll_interval=0.1)
    delayed, retried = await az.queue(broker), await az.queue(broker)
    await broker.publish(retried, b"retry")

    async def publish_with_delay() -> None:
        async with broker.consume(delayed, prefetch=1) as sub:
            assert isinstance(sub, AzureQueueSubscription)
            start = time.monotonic()  # before the call: the delay cannot start earlier on the server
            await broker.publish(delayed, b"later", delay=DELAY)
            await absent_until(sub, start)
            [d] = await receive(sub, 1)
            assert d.body == b"later" and d.attempt == 1
            await d.ack()

    async def nack_with_delay() -> None:
        async with broker.consume(retried, prefetch=1) as sub:
            assert isinstance(sub, AzureQueueSubscription)
            [first] = await receive(sub, 1)
            start = time.monotonic()
            await first.nack(requeue=True, delay=DELAY)
            await absent_until(sub, start)
            [second] = await receive(sub, 1)
            assert second.body == b"retry" and second.attempt == 2
            await second.ack()

    await asyncio.gather(publish_with_delay(), nack_with_delay())


# -- poison queue ---------------------------------------------------------------------------------------------


async def test_failing_message_moves_to_the_poison_queue_with_its_reason(az: Azure) -> None:
    broker = await az.broker()
    queue = await az.queue(broker, "poison")
    assert broker.dead_letter_name(queue) == f"{queue}-poison"

    async def fail(message: Message) -> None:
        raise RuntimeError("calibration missing")

    consumer = Consumer(broker, queue, fail, ConsumerConfig(max_attempts=2, retry_delay=0.1))
    assert consumer.dead_letter_queue == f"{queue}-poison"
    await consumer.start()
    await Producer(broker).send(queue, Envelope(id="bad-1", body={"reading": 3}))
    await wait_for(lambda: consumer.stats.dead_lettered == 1, what="dead-letter")
    await consumer.stop()
    async with broker.consume(f"{queue}-poison", prefetch=1) as sub:
        [dead] = await receive(sub, 1)
        assert dead.message_id == "bad-1"
        assert "calibration missing" in dead.headers["x-death-reason"]
        assert dead.headers["x-original-queue"] == queue
        assert dead.headers["x-attempts"] == 2
        assert Envelope.from_bytes(dead.body).body == {"reading": 3}
        await dead.ack()
    assert await broker.depth(queue) == 0


def test_queue_names_are_checked_and_converted() -> None:
    broker = AzureQueueBroker.from_url("azurequeue://devstorage")
    assert azure_queue_name("Sensors.Readings_v2") == "sensors-readings-v2"
    assert azure_queue_name("x") == "xqq"
    assert len(broker.dead_letter_name(azure_queue_name("a" * 100))) == 63
    assert broker.dead_letter_name("Readings.v2") == "readings-v2-poison"  # mapped like the queue itself
    with pytest.raises(ConfigurationError, match=r"invalid Azure queue name 'x\.' \(as 'x'\)"):
        broker.dead_letter_name("x.")
    with pytest.raises(ConfigurationError, match="no room for its poison queue"):
        broker.dead_letter_name("q" * 60)


# -- size and encoding ----------------------------------------------------------------------------------------


async def test_size_limit_is_measured_on_the_encoded_text(az: Azure) -> None:
    broker = await az.broker()
    queue = await az.queue(broker)
    limit = broker.capabilities.max_message_bytes

    # A body at the advertised limit fits, with the producer's headers and a long dead-letter reason.
    headers = {**broker_headers(Envelope(body=None)), "x-death-reason": "r" * 4000, "x-original-queue": queue}
    text = broker.encode(b"\xff" * limit, headers=headers, message_id=uuid.uuid4().hex)
    assert len(text.encode()) <= AZURE_MAX_MESSAGE_TEXT
    with pytest.raises(MessageTooLarge, match=str(limit)):
        broker.encode(b"\xff" * (limit + 1))

    # Pad a header so the encoded text is exactly 65,536 bytes: Azure takes it, and it round-trips.
    body = bytes(range(256)) * 100
    base = len(broker.encode(body, headers={"pad": ""}, message_id="edge"))
    padded = {"pad": "p" * (AZURE_MAX_MESSAGE_TEXT - base)}
    assert len(broker.encode(body, headers=padded, message_id="edge")) == AZURE_MAX_MESSAGE_TEXT
    await broker.publish(queue, body, headers=padded, message_id="edge")
    async with broker.consume(queue, prefetch=1) as sub:
        [d] = await receive(sub, 1)
        assert d.body == body and d.headers == padded and d.message_id == "edge"
        await d.ack()

    # One byte more: refused before sending, naming Azure's limit on the encoded text ...
    over = {"pad": padded["pad"] + "p"}
    with pytest.raises(MessageTooLarge) as info:
        await broker.publish(queue, body, headers=over, message_id="edge")
    assert "65536" in str(info.value) and "65537" in str(info.value)
    assert "encoding" in str(info.value)
    # ... and it is the service's own limit: the same 65,537 bytes sent raw are refused by Azure.
    raw = az.raw_client(queue)
    with pytest.raises(HttpResponseError) as refused:
        await raw.send_message(broker.encode(body, headers=padded, message_id="edge") + " ")
    assert refused.value.status_code == 413
    assert await broker.depth(queue) == 0


async def test_binary_payloads_headers_and_keys_survive(az: Azure) -> None:
    broker = await az.broker()
    queue = await az.queue(broker)
    payloads = {
        "all-bytes": bytes(range(256)) * 4,
        "nul": b"\x00" * 10,
        "bad-utf8": b"\xff\xfe\xc3\x28",
        "random": os.urandom(40 * 1024),
        "empty": b"",
        "text": "température ✓".encode(),
    }
    await broker.publish_batch(
        queue,
        [
            OutgoingMessage(body, {"name": name, "n": 1, "nested": {"ok": True}}, message_id=name, key=f"k-{name}")
            for name, body in payloads.items()
        ],
    )
    async with broker.consume(queue, prefetch=10) as sub:
        got = await receive(sub, len(payloads))
        for d in got:
            assert d.body == payloads[d.message_id], d.message_id
            assert d.headers == {"name": d.message_id, "n": 1, "nested": {"ok": True}}
            assert d.key == f"k-{d.message_id}"
            await d.ack()


async def test_foreign_text_and_json_messages_are_consumed(az: Azure) -> None:
    broker = await az.broker()
    queue = await az.queue(broker, "foreign")
    raw = az.raw_client(queue)
    await raw.send_message('{"reading": 21.5}')
    await raw.send_message("plain text, not json")
    await raw.send_message('{"tsq":1,"id":"x","b":"!!! not base64"}')  # looks like a frame, is not one
    handled: list[object] = []

    async def handle(message: Message) -> None:
        handled.append(message.envelope.body)

    consumer = Consumer(broker, queue, handle, ConsumerConfig(max_attempts=2))
    await consumer.start()
    await wait_for(lambda: len(handled) == 2 and consumer.stats.dead_lettered == 1, what="2 handled + 1 poison")
    await consumer.stop()
    # The JSON message is a raw envelope; the broken frame is JSON too, so it is a foreign message.
    assert {"reading": 21.5} in handled
    assert {"tsq": 1, "id": "x", "b": "!!! not base64"} in handled
    async with broker.consume(broker.dead_letter_name(queue), prefetch=1) as sub:
        [dead] = await receive(sub, 1)
        assert dead.body == b"plain text, not json"
        assert "malformed" in dead.headers["x-death-reason"]
        await dead.ack()


async def test_foreign_base64_messages_decode_when_asked(az: Azure) -> None:
    broker = await az.broker(foreign_encoding="base64")
    queue = await az.queue(broker)
    raw = az.raw_client(queue)
    await raw.send_message(base64.b64encode(b'{"a": 1}\x00binary').decode())
    await raw.send_message("not*base64")
    async with broker.consume(queue, prefetch=2) as sub:
        got = {d.body: d for d in await receive(sub, 2)}
        assert set(got) == {b'{"a": 1}\x00binary', b"not*base64"}
        assert "x-azure-frame-error" not in got[b'{"a": 1}\x00binary'].headers
        assert "base64" in got[b"not*base64"].headers["x-azure-frame-error"]
        for d in got.values():
            assert d.attempt == 1
            await d.ack()


# -- polling --------------------------------------------------------------------------------------------------


async def test_empty_queue_polling_backs_off_and_resets_on_work(az: Azure) -> None:
    interval = 0.8
    broker = await az.broker(poll_interval=interval)
    producer = await az.broker()  # another connection: its publishes cannot wake the subscription directly
    queue = await az.queue(broker)
    async with broker.consume(queue, prefetch=4) as sub:
        assert isinstance(sub, AzureQueueSubscription)
        # 0.05 s doubled after each empty poll reaches the cap after 4 of them.
        await wait_for(lambda: sub.idle_delay == interval, timeout=20, what="the idle delay to reach poll_interval")
        assert sub.empty_polls >= 4, sub.empty_polls
        # Backed off: three more empty polls take at least the two full pauses between them (a busy loop would
        # take milliseconds). A slow machine only makes this take longer, never shorter.
        start, before = time.monotonic(), sub.empty_polls
        await wait_for(lambda: sub.empty_polls >= before + 3, timeout=20, what="three more empty polls")
        assert time.monotonic() - start >= 2 * interval - 0.1
        assert sub.idle_delay == interval  # capped, not growing further
        await producer.publish(queue, b"work")
        [d] = await receive(sub, 1, timeout=10)
        assert sub.idle_delay == MIN_POLL_DELAY  # work arrived: polling is eager again
        await d.ack()


async def test_publish_through_the_same_broker_wakes_a_sleeping_poller(az: Azure) -> None:
    asleep = 600.0  # far beyond the receive's deadline below: only the wake-up can deliver in time
    broker = await az.broker(poll_interval=asleep)
    queue = await az.queue(broker)
    async with broker.consume(queue, prefetch=4) as sub:
        assert isinstance(sub, AzureQueueSubscription)
        # The next empty poll sleeps this long (the back-off would get there by itself, after hours).
        sub.idle_delay = asleep
        before = sub.empty_polls
        await wait_for(lambda: sub.empty_polls > before, timeout=20, what="an empty poll that starts the long sleep")
        polls = sub.polls
        await broker.publish(queue, b"wake up")
        [d] = await receive(sub, 1, timeout=30)
        assert d.body == b"wake up"
        assert sub.polls > polls
        await d.ack()


async def test_an_outage_is_logged_once_and_receiving_resumes(az: Azure, caplog: pytest.LogCaptureFixture) -> None:
    from tests.support.proxy import TcpProxy

    proxy = TcpProxy(10001)
    await proxy.up()
    url = f"azurequeue://devstoreaccount1:{quote(DEV_KEY, safe='')}@127.0.0.1:{proxy.port}/devstoreaccount1"
    broker = await az.broker(url, poll_interval=0.2)
    queue = await az.queue(await az.broker())
    caplog.set_level(logging.DEBUG, logger="taskstream.brokers.azure")
    try:
        async with broker.consume(queue, prefetch=2) as sub:
            assert isinstance(sub, AzureQueueSubscription)
            await wait_for(lambda: sub.polls >= 1, what="a receive through the proxy before the outage")
            await proxy.down()
            # The SDK retries each receive a few times; wait for the second failed receive of the outage.
            await wait_for(lambda: "failed again" in caplog.text, timeout=90, what="two failed receives")
            await proxy.up()
            await az.raw_client(queue).send_message("back")
            [d] = await receive(sub, 1, timeout=60)
            assert d.body == b"back"
            await d.ack()
    finally:
        await proxy.stop()
    failed = [r for r in caplog.records if r.levelno == logging.WARNING and "failed" in r.getMessage()]
    again = [r for r in caplog.records if "work again" in r.getMessage()]
    assert len(failed) == 1 and len(again) == 1, caplog.text


# -- configuration and secrets --------------------------------------------------------------------------------


async def test_every_url_form_reaches_azurite(az: Azure, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", DEV)
    urls = [
        "azurequeue://devstorage",
        "azurequeue://devstorage:10001?visibility_timeout=7",
        "azurequeue://",  # from the environment
        f"azurequeue://?connection_string={quote(DEV_CONNECTION_STRING, safe='')}",
        f"azurequeue://devstoreaccount1:{quote(DEV_KEY, safe='')}@127.0.0.1:10001/devstoreaccount1",
    ]
    queue = azure_queue_name(f"urls-{uuid.uuid4().hex[:8]}")
    az.queues.append(queue)
    for i, url in enumerate(urls):
        broker = await az.broker(url)
        await broker.declare(queue)
        await broker.publish(queue, f"via {i}".encode())
    with pytest.raises(ConfigurationError, match="7 days"):
        await az.brokers[0].publish(queue, b"too late", delay=8 * 24 * 3600)
    assert az.brokers[1].capabilities.visibility_timeout == 7.0
    assert await az.brokers[0].depth(queue) == len(urls)
    registered = broker_from_url("azurequeue://devstorage?poll_interval=0.5")
    assert isinstance(registered, AzureQueueBroker) and registered.poll_interval == 0.5


async def test_secrets_stay_out_of_reprs_errors_and_logs(az: Azure, caplog: pytest.LogCaptureFixture) -> None:
    fake_key = base64.b64encode(b"definitely-not-the-azurite-key-0123456789").decode()
    wrong = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={fake_key};QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    )
    caplog.set_level(logging.DEBUG)
    broker = await az.broker("azurequeue://", connection_string=wrong)
    assert fake_key not in repr(broker)
    with pytest.raises(BrokerConnectionError) as info:  # Azurite checks the shared-key signature
        await broker.declare(azure_queue_name(f"secret-{uuid.uuid4().hex[:8]}"))
    assert "credential" in str(info.value)
    with pytest.raises(ConfigurationError) as bad:
        AzureQueueBroker.from_url(f"azurequeue://acct:{quote(fake_key, safe='')}@acct.queue.core.windows.net?bogus=1")
    assert "bogus" in str(bad.value)
    with pytest.raises(ConfigurationError) as bad_cs:
        AzureQueueBroker.from_url(f"azurequeue://?connection_string={quote('AccountKey=' + fake_key, safe='')}")
    for text in (str(info.value), str(bad.value), str(bad_cs.value), caplog.text):
        assert fake_key not in text
        assert quote(fake_key, safe="") not in text


def test_bad_configuration_says_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="AZURE_STORAGE_KEY"):
        AzureQueueBroker.from_url("azurequeue://myaccount.queue.core.windows.net")
    with pytest.raises(ConfigurationError, match="AZURE_STORAGE_CONNECTION_STRING"):
        AzureQueueBroker.from_url("azurequeue://")
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        AzureQueueBroker.from_url("azurequeue://devstorage?visibility_timeout=0")
    with pytest.raises(ConfigurationError, match="foreign_encoding"):
        AzureQueueBroker.from_url("azurequeue://devstorage?foreign_encoding=rot13")
    monkeypatch.setenv("AZURE_STORAGE_KEY", base64.b64encode(b"k" * 32).decode())
    broker = AzureQueueBroker.from_url("azurequeue://myaccount.queue.core.windows.net")
    assert "https://myaccount.queue.core.windows.net" in repr(broker)

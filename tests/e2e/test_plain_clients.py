"""Plain clients of each broker talking to a ``taskstream run`` process, as the README's "Plain clients" section
tells them to: JSON in, the taskstream envelope out, bad input in the dead-letter queue with its reason."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import aio_pika
import boto3
import orjson
import pytest
import zmq
import zmq.asyncio
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue.aio import QueueClient

from taskstream.brokers.azure_queues import native_queue_name
from taskstream.brokers.base import broker_from_url
from taskstream.brokers.rabbitmq import DLX_EXCHANGE
from taskstream.brokers.sqs import SQSBroker
from taskstream.brokers.zeromq import Forwarder, TopicPublisher, TopicSubscriber
from taskstream.messages import CONTENT_TYPE
from tests.e2e.conftest import SQS_ENDPOINT, URLS, Served, connected
from tests.support.waiting import wait_for

ITEMS = 5


def check_output(envelopes: list[dict[str, Any]]) -> None:
    """What a plain consumer reads: taskstream envelopes whose ``body`` is the handler's return value."""
    assert all(e["ts"] == 1 and e["kind"] == "record" and e["correlation_id"] for e in envelopes), envelopes
    assert sorted(e["body"]["n"] for e in envelopes) == list(range(ITEMS))
    assert all(e["body"]["seen_by"] == "taskstream" for e in envelopes)


# -- RabbitMQ -------------------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_plain_amqp_publisher_and_consumer(
    serve: Callable[..., Served], queues: Callable[[str, str], str]
) -> None:
    url = URLS["rabbitmq"]
    queue, out = queues(url, "plain-in"), queues(url, "plain-out")
    worker = serve(url, queue, publish_to=out).start()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()

        async def declared() -> None:
            nonlocal channel
            while True:
                try:
                    await channel.declare_queue(out, passive=True)
                    await channel.declare_queue(queue, passive=True)  # declared after its output queue
                    return
                except aio_pika.exceptions.ChannelClosed:
                    channel = await connection.channel()
                    await asyncio.sleep(0.1)

        await asyncio.wait_for(declared(), 30)  # the app declared its queues
        # Declaring a taskstream queue with other arguments is refused by RabbitMQ (documented)...
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-dead-letter-exchange"):
            await channel.declare_queue(queue, durable=True)
        channel = await connection.channel()
        # ...declaring it passively, or with the documented arguments, works.
        await channel.declare_queue(queue, passive=True)
        await channel.declare_queue(
            queue,
            durable=True,
            arguments={"x-dead-letter-exchange": DLX_EXCHANGE, "x-dead-letter-routing-key": queue},
        )
        for n in range(ITEMS):
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"n": n}).encode(), content_type="application/json"), routing_key=queue
            )
        await channel.default_exchange.publish(aio_pika.Message(b"not json", message_id="plain-bad"), queue)

        results = await channel.declare_queue(out, passive=True)
        envelopes = []
        async with asyncio.timeout(60):
            while len(envelopes) < ITEMS:
                message = await results.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                await message.ack()
                assert message.content_type == CONTENT_TYPE
                assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                assert message.headers["ts_kind"] == "record"
                envelope = json.loads(message.body)
                assert message.message_id == envelope["id"]
                assert message.correlation_id == envelope["correlation_id"]
                envelopes.append(envelope)
        check_output(envelopes)

        dead = await channel.declare_queue(f"{queue}.dlq", passive=True)
        async with asyncio.timeout(30):
            while (bad := await dead.get(fail=False)) is None:
                await asyncio.sleep(0.1)
        await bad.ack()
        assert bad.body == b"not json" and bad.message_id == "plain-bad"
        assert "not valid JSON" in str(bad.headers["x-death-reason"])
        assert bad.headers["x-original-queue"] == queue
    assert await worker.terminate() == 0


@pytest.mark.rabbitmq
async def test_float_headers_keep_their_value_on_rabbitmq(queues: Callable[[str, str], str]) -> None:
    url = URLS["rabbitmq"]
    queue = queues(url, "float-headers")
    headers = {"x-dead-lettered-at": 1795664159.8912, "ratio": 0.1}
    async with connected(url) as broker:
        await broker.declare(queue)
        await broker.publish(queue, b"{}", headers=headers)
        async with broker.consume(queue, prefetch=1) as subscription, asyncio.timeout(30):
            delivery = await subscription.__anext__()
            await delivery.ack()
    assert {k: delivery.headers[k] for k in headers} == headers


# -- SQS ------------------------------------------------------------------------------------------------------


@pytest.mark.sqs
async def test_plain_boto3_sender_and_receiver(serve: Callable[..., Served], queues: Callable[[str, str], str]) -> None:
    url = URLS["sqs"]
    queue, out = queues(url, "plain-in"), queues(url, "plain-out")
    names = SQSBroker.from_url(url)  # only for its name mapping: prefix + '.' -> '-'
    worker = serve(url, queue, publish_to=out).start()
    sqs = boto3.client("sqs", endpoint_url=SQS_ENDPOINT, region_name="us-east-1")

    def queue_url(name: str) -> str | None:
        try:
            return str(sqs.get_queue_url(QueueName=names.sqs_name(name))["QueueUrl"])
        except sqs.exceptions.QueueDoesNotExist:
            return None

    await wait_for(
        lambda: None not in (queue_url(queue), queue_url(out)), timeout=30, what="the app to create its queues"
    )
    inbound, outbound = queue_url(queue), queue_url(out)
    assert inbound and outbound and names.sqs_name(queue).endswith(queue.replace(".", "-"))
    for n in range(ITEMS):
        await asyncio.to_thread(sqs.send_message, QueueUrl=inbound, MessageBody=json.dumps({"n": n}))
    await asyncio.to_thread(sqs.send_message, QueueUrl=inbound, MessageBody="not json")

    envelopes: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while len(envelopes) < ITEMS:
            got = await asyncio.to_thread(
                sqs.receive_message,
                QueueUrl=outbound,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                MessageAttributeNames=["All"],
            )
            for message in got.get("Messages", []):
                meta = json.loads(message["MessageAttributes"]["taskstream"]["StringValue"])
                assert meta["h"]["content_type"] == CONTENT_TYPE
                envelopes.append(json.loads(message["Body"]))
                await asyncio.to_thread(sqs.delete_message, QueueUrl=outbound, ReceiptHandle=message["ReceiptHandle"])
    check_output(envelopes)

    dead = queue_url(names.dead_letter_name(queue))
    assert dead is not None

    def receive(queue_url: str) -> dict[str, Any]:
        return dict(sqs.receive_message(QueueUrl=queue_url, MessageAttributeNames=["All"]))

    async with asyncio.timeout(30):
        while not (got := await asyncio.to_thread(receive, dead)).get("Messages"):
            await asyncio.sleep(0.2)
    bad = got["Messages"][0]
    assert bad["Body"] == "not json"
    reason = json.loads(bad["MessageAttributes"]["taskstream"]["StringValue"])["h"]["x-death-reason"]
    assert "not valid JSON" in reason
    assert await worker.terminate() == 0


# -- Azure Storage Queues -------------------------------------------------------------------------------------


@pytest.mark.azure
async def test_plain_azure_sdk_sender_and_receiver(
    serve: Callable[..., Served], queues: Callable[[str, str], str]
) -> None:
    url = URLS["azure"]
    queue, out = queues(url, "plain-in"), queues(url, "plain-out")  # dotted names: Azure queues get hyphens
    worker = serve(url, queue, publish_to=out).start()

    def client(name: str) -> QueueClient:
        return QueueClient.from_connection_string("UseDevelopmentStorage=true", queue_name=name)

    async def exists(name: str) -> bool:
        async with client(name) as c:
            try:
                await c.get_queue_properties()
            except ResourceNotFoundError:
                return False
            return True

    inbound, outbound = native_queue_name(queue), native_queue_name(out)
    assert inbound == queue.replace(".", "-")
    async with asyncio.timeout(30):
        while not (await exists(inbound) and await exists(outbound)):
            await asyncio.sleep(0.1)
    async with client(inbound) as sender:
        for n in range(ITEMS):
            await sender.send_message(json.dumps({"n": n}))
        await sender.send_message("not json")

    envelopes: list[dict[str, Any]] = []
    async with client(outbound) as receiver, asyncio.timeout(60):
        while len(envelopes) < ITEMS:
            async for message in receiver.receive_messages(max_messages=32):
                frame = json.loads(message.content)  # {"tsq":1,"id":...,"b":<base64 of the envelope>,"h":{...}}
                assert frame["h"]["content_type"] == CONTENT_TYPE
                envelopes.append(json.loads(base64.b64decode(frame["b"])))
                await receiver.delete_message(message)
            await asyncio.sleep(0.1)
    check_output(envelopes)

    async with client(f"{inbound}-poison") as poison, asyncio.timeout(30):
        frames = []
        while not frames:
            frames = [json.loads(m.content) async for m in poison.receive_messages()]
    assert base64.b64decode(frames[0]["b"]) == b"not json"
    assert "not valid JSON" in frames[0]["h"]["x-death-reason"]
    assert await worker.terminate() == 0
    # `taskstream run` keeps the Azure SDK's per-request HTTP log out of the output
    output = worker.output()
    assert "app started" in output and "http_logging_policy" not in output and "Request URL" not in output


# -- ZeroMQ ---------------------------------------------------------------------------------------------------


@pytest.mark.zmq
async def test_plain_pyzmq_pub_and_sub_through_the_forwarder() -> None:
    context = zmq.asyncio.Context.instance()
    async with Forwarder("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as forwarder:
        # a plain SUB reads what a TopicPublisher sends: [topic, [publisher, seq, headers], body]
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"5")
        sub.connect(forwarder.backend_endpoint)
        try:
            async with TopicPublisher(forwarder.frontend_endpoint, name="ts") as publisher:
                await publisher.wait_subscribed("5")
                await publisher.publish("5", orjson.dumps({"v": 1}), headers={"unit": "C"})
                topic, meta, body = await asyncio.wait_for(sub.recv_multipart(), 10)
        finally:
            sub.close()
        assert (topic, orjson.loads(meta), orjson.loads(body)) == (b"5", ["ts", 1, {"unit": "C"}], {"v": 1})

        # a TopicSubscriber reads what a plain PUB sends: [topic, body] or one "topic payload" frame
        async with TopicSubscriber(forwarder.backend_endpoint, ["3"], exact=True) as subscriber:
            pub = context.socket(zmq.XPUB)  # XPUB: learn when the subscription has arrived
            pub.setsockopt(zmq.LINGER, 0)
            pub.connect(forwarder.frontend_endpoint)
            try:
                async with asyncio.timeout(10):
                    while await pub.recv() != b"\x013":  # the forwarder also replays other subscriptions
                        pass
                await pub.send_multipart([b"3", b'{"v": 2}'])
                await pub.send(b"30 not this topic")
                await pub.send(b"3 21.5")
                first = await asyncio.wait_for(subscriber.recv(), 10)
                second = await asyncio.wait_for(subscriber.recv(), 10)
            finally:
                pub.close()
        assert (first.topic, first.body, first.headers, first.publisher) == ("3", b'{"v": 2}', {}, "")
        assert (second.topic, second.body) == ("3", b"3 21.5")


# -- the same App on every broker ------------------------------------------------------------------------------


@pytest.mark.azure
async def test_dotted_queue_names_work_on_azure(queues: Callable[[str, str], str]) -> None:
    """``orders.in`` is a fine queue name on every broker: Azure stores it as ``orders-in``."""
    url = URLS["azure"]
    queue = queues(url, "Dotted.Name")
    broker = broker_from_url(url)
    async with broker:
        await broker.declare(queue)
        await broker.publish(queue, b'{"n": 1}')
        assert broker.dead_letter_name(queue) == f"{native_queue_name(queue)}-poison"
        async with broker.consume(queue, prefetch=1) as subscription, asyncio.timeout(30):
            delivery = await subscription.__anext__()
            await delivery.ack()
    assert delivery.body == b'{"n": 1}' and delivery.queue == queue

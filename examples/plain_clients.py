"""Plain clients of each broker feeding ``examples.two_stage`` and reading its results: no taskstream here.

Serve the two-stage app on a broker, then run this with the same broker URL::

    taskstream run examples.two_stage:app --broker amqp://guest:guest@127.0.0.1:5672/
    python examples/plain_clients.py amqp://guest:guest@127.0.0.1:5672/

    taskstream run examples.two_stage:app --broker 'sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324'
    python examples/plain_clients.py 'sqs://us-east-1/?endpoint_url=http://127.0.0.1:9324'

    taskstream run examples.two_stage:app --broker azurequeue://devstorage
    python examples/plain_clients.py azurequeue://devstorage

Each client sends orders as plain JSON to ``orders.in`` and reads the totals from ``orders.out``. What
taskstream publishes is its envelope, a JSON object whose ``body`` is the handler's return value. Queue names
as the broker knows them: RabbitMQ keeps ``orders.in``; SQS and Azure Storage Queues turn the dot into a hyphen
(``orders-in``). A body the app cannot use lands in the dead-letter queue with the reason in its headers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

ORDERS = [{"item": "apple", "quantity": 3}, {"item": "fig", "quantity": 2}, {"item": "pear", "quantity": 4}]


async def amqp(url: str) -> list[Any]:
    """aio-pika: publish to the default exchange; declare nothing (or passively): taskstream owns the queues."""
    import aio_pika

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for order in ORDERS:
            message = aio_pika.Message(json.dumps(order).encode(), content_type="application/json")
            await channel.default_exchange.publish(message, routing_key="orders.in")
        results = await channel.declare_queue("orders.out", passive=True)
        totals = []
        while len(totals) < len(ORDERS):
            message = await results.get(fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            totals.append(json.loads(message.body)["body"])
        return totals


async def sqs(url: str) -> list[Any]:
    """aiobotocore (what ``taskstream[sqs]`` installs; boto3 calls look the same): the queues are ``orders-in``
    and ``orders-out`` (after any ``queue_prefix``)."""
    from aiobotocore.session import get_session

    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    prefix = query.get("queue_prefix", "")
    region, endpoint = parts.netloc or None, query.get("endpoint_url")
    async with get_session().create_client("sqs", region_name=region, endpoint_url=endpoint) as client:
        inbound = (await client.get_queue_url(QueueName=f"{prefix}orders-in"))["QueueUrl"]
        outbound = (await client.get_queue_url(QueueName=f"{prefix}orders-out"))["QueueUrl"]
        for order in ORDERS:
            await client.send_message(QueueUrl=inbound, MessageBody=json.dumps(order))
        totals = []
        while len(totals) < len(ORDERS):
            got = await client.receive_message(QueueUrl=outbound, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            for message in got.get("Messages", []):
                totals.append(json.loads(message["Body"])["body"])
                await client.delete_message(QueueUrl=outbound, ReceiptHandle=message["ReceiptHandle"])
        return totals


async def azure(url: str) -> list[Any]:
    """azure-storage-queue: send JSON text to ``orders-in``; ``orders-out`` holds taskstream frames
    ``{"tsq": 1, "id": ..., "b": <base64 of the envelope>, "h": {headers}}``."""
    from azure.storage.queue.aio import QueueClient

    parts = urlsplit(url)
    if parts.netloc.split(":")[0] != "devstorage":
        raise SystemExit("this example knows only Azurite's development account (azurequeue://devstorage)")
    connection = "UseDevelopmentStorage=true"
    async with (
        QueueClient.from_connection_string(connection, "orders-in") as inbound,
        QueueClient.from_connection_string(connection, "orders-out") as outbound,
    ):
        for order in ORDERS:
            await inbound.send_message(json.dumps(order))
        totals = []
        while len(totals) < len(ORDERS):
            async for message in outbound.receive_messages(max_messages=32):
                envelope = json.loads(base64.b64decode(json.loads(message.content)["b"]))
                totals.append(envelope["body"])
                await outbound.delete_message(message)
            await asyncio.sleep(0.1)
        return totals


def main(url: str) -> list[Any]:
    scheme = url.split("://", 1)[0]
    started = time.monotonic()
    if scheme in ("amqp", "amqps"):
        totals = asyncio.run(amqp(url))
    elif scheme == "sqs":
        totals = asyncio.run(sqs(url))
    elif scheme == "azurequeue":
        totals = asyncio.run(azure(url))
    else:
        raise SystemExit(f"no plain client here for {scheme!r} URLs (amqp, sqs, azurequeue)")
    for total in sorted(totals, key=lambda t: str(t["item"])):
        print(total)
    print(f"{len(totals)} totals in {time.monotonic() - started:.1f} s")
    return totals


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/")

"""RabbitMQ backend on aio-pika: robust connection, pipelined publisher confirms, manual acks.

URL: ``amqp://user:password@host:5672/vhost?options`` (``amqps://`` for TLS). How ack, nack, delay, dead-letter,
attempts and confirms map onto AMQP, and the URL options with their defaults, are in ``docs/brokers.md``.

Modules: ``config`` (options, URL), ``connection`` (robust connection, channels, outages), ``channels`` (error
mapping, the channel guard), ``codec`` (properties and header tables), ``topology`` (declarations, their replay,
delay buckets), ``subscription`` and ``acks`` (consuming, requeue-by-republish, multi-acks), ``broker``
(publishing, the Broker protocol).
"""

from taskstream.brokers.rabbitmq.broker import RabbitMQBroker
from taskstream.brokers.rabbitmq.config import (
    DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_TOPIC_EXCHANGE,
    RABBITMQ_MAX_MESSAGE_BYTES,
    RabbitMQConfig,
)
from taskstream.brokers.rabbitmq.topology import DELAY_EXCHANGE, DLX_EXCHANGE

__all__ = [
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_TOPIC_EXCHANGE",
    "DELAY_EXCHANGE",
    "DLX_EXCHANGE",
    "RABBITMQ_MAX_MESSAGE_BYTES",
    "RabbitMQBroker",
    "RabbitMQConfig",
]

"""AWS SQS backend on aiobotocore: long polling, batched sends and settles, FIFO groups, native redrive.

``sqs://[region]/?endpoint_url=...&queue_prefix=...&visibility_timeout=30``; credentials come from the AWS
chain, never from the URL. ``docs/brokers.md`` (section SQS) maps every broker operation onto the SQS API and
lists the URL options. Modules: ``config`` (options and limits), ``client`` (the aiobotocore client, error
mapping, batched calls), ``codec`` (the message attribute), ``subscription`` (receiving, on
:mod:`taskstream.brokers.polling`), ``broker``.
"""

from taskstream.brokers.sqs.broker import SQSBroker
from taskstream.brokers.sqs.config import (
    DEFAULT_GROUP,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WAIT_TIME,
    HEADER_ALLOWANCE,
    OPTIONS,
    SQS_MAX_MESSAGE_BYTES,
    SQSOptions,
)

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DEFAULT_WAIT_TIME",
    "HEADER_ALLOWANCE",
    "OPTIONS",
    "SQSBroker",
    "SQSOptions",
    "SQS_MAX_MESSAGE_BYTES",
]

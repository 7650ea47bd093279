"""Limits that differ by broker, each under its own name, with where the number comes from.

A broker's ``Capabilities.max_message_bytes`` starts at its constant here (a URL option can lower it, and some
brokers learn a smaller one from the server); the producer offloads anything larger to the claim-check store or
raises ``MessageTooLarge``. ``docs/brokers.md`` shows the same defaults in each broker's option table.

Example:
    >>> from taskstream.constants import SQS_MAX_MESSAGE_BYTES
    >>> SQS_MAX_MESSAGE_BYTES
    1048576
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AZURE_QUEUE_MAX_MESSAGE_BYTES",
    "MEMORY_MAX_MESSAGE_BYTES",
    "RABBITMQ_MAX_MESSAGE_BYTES",
    "SQS_MAX_MESSAGE_BYTES",
    "ZEROMQ_MAX_MESSAGE_BYTES",
]

KIB: Final = 1024
MIB: Final = 1024 * KIB

#: The embedded memory broker: no wire, so no protocol limit; 16 MiB keeps one process's queues from holding
#: huge bodies and makes the claim-check path run on the default broker too.
MEMORY_MAX_MESSAGE_BYTES: Final = 16 * MIB

#: RabbitMQ: the server's default ``max_message_size`` (128 MiB since RabbitMQ 3.10). AMQP does not tell a client
#: the limit, so the broker adopts a smaller one when the server refuses a message.
RABBITMQ_MAX_MESSAGE_BYTES: Final = 128 * MIB

#: AWS SQS: the largest ``MaximumMessageSize`` a queue can have (1 MiB, body and attributes together).
SQS_MAX_MESSAGE_BYTES: Final = 1 * MIB

#: Azure Storage Queues: a message's text is at most 64 KiB after encoding; a 44 KiB body is 60,076 characters of
#: base64, which leaves about 5 KiB for the frame, id, key and headers (a dead-letter reason is up to 4,000).
AZURE_QUEUE_MAX_MESSAGE_BYTES: Final = 44 * KIB

#: ZeroMQ (client and device): ZeroMQ itself has no limit; the client checks each body before sending and the
#: device refuses larger ones (``taskstream zmq-device --max-message-bytes``), as the device holds its queues
#: in memory.
ZEROMQ_MAX_MESSAGE_BYTES: Final = 16 * MIB

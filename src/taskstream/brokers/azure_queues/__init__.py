"""Azure Storage Queues backend on ``azure.storage.queue.aio``: at-least-once with a visibility heartbeat.

``azurequeue://devstorage`` (Azurite), ``azurequeue://<account>.queue.core.windows.net`` or a connection
string; ``docs/brokers.md`` (section Azure) maps every broker operation onto the Azure API and lists the URL
options. Modules: ``config`` (options, names, connection strings), ``codec`` (the message frame), ``errors``
(SDK errors mapped), ``subscription`` (receiving, on :mod:`taskstream.brokers.polling`), ``broker``.
"""

from taskstream.brokers.azure_queues.broker import AzureQueueBroker
from taskstream.brokers.azure_queues.codec import decode_frame, encode_frame
from taskstream.brokers.azure_queues.config import (
    AZURE_MAX_MESSAGE_TEXT,
    AZURE_QUEUE_MAX_MESSAGE_BYTES,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEVSTORE_ACCOUNT,
    MIN_POLL_DELAY,
    OPTIONS,
    azure_queue_name,
    native_queue_name,
)
from taskstream.brokers.azure_queues.subscription import AzureQueueDelivery, AzureQueueSubscription

__all__ = [
    "AZURE_MAX_MESSAGE_TEXT",
    "AZURE_QUEUE_MAX_MESSAGE_BYTES",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DEVSTORE_ACCOUNT",
    "MIN_POLL_DELAY",
    "OPTIONS",
    "AzureQueueBroker",
    "AzureQueueDelivery",
    "AzureQueueSubscription",
    "azure_queue_name",
    "decode_frame",
    "encode_frame",
    "native_queue_name",
]

"""taskstream: Python functions as async consumers over pluggable message brokers.

Example:
    >>> import taskstream
    >>> app = taskstream.App()  # embedded memory broker, no server needed
"""

from taskstream.app import App
from taskstream.brokers.base import Broker, Capabilities, Delivery, broker_from_url
from taskstream.consumer import Consumer, ConsumerConfig, Message
from taskstream.errors import (
    ConfigurationError,
    MalformedMessage,
    MessageTooLarge,
    Reject,
    Retry,
    TaskError,
    TaskstreamError,
)
from taskstream.messages import Envelope
from taskstream.producer import Producer
from taskstream.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "App",
    "Broker",
    "Capabilities",
    "ConfigurationError",
    "Consumer",
    "ConsumerConfig",
    "Delivery",
    "Envelope",
    "MalformedMessage",
    "Message",
    "MessageTooLarge",
    "Producer",
    "Reject",
    "Retry",
    "Settings",
    "TaskError",
    "TaskstreamError",
    "__version__",
    "broker_from_url",
]

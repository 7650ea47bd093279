"""Broker backends. Use :func:`broker_from_url`; backend modules import their drivers lazily."""

from taskstream.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    OutgoingMessage,
    Subscription,
    broker_from_url,
    dead_letter_name,
)

__all__ = [
    "Broker",
    "Capabilities",
    "Delivery",
    "OutgoingMessage",
    "Subscription",
    "broker_from_url",
    "dead_letter_name",
]

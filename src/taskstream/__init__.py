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
from taskstream.stream_ops import (
    Count,
    EventClock,
    Max,
    Mean,
    Min,
    Pipeline,
    SessionWindow,
    SimulatedCamera,
    SimulatedSensor,
    SlidingWindow,
    Stop,
    Stream,
    Sum,
    SystemClock,
    TumblingWindow,
)
from taskstream.stream_ops.service import Service, ServiceClient
from taskstream.tasks import (
    DependencyFailed,
    Task,
    TaskFuture,
    TaskInfo,
    TaskNotFound,
    TaskRefused,
    TaskTimeout,
    WorkerLost,
    as_completed,
    gather,
)

__version__ = "0.1.0"

__all__ = [
    "App",
    "Broker",
    "Capabilities",
    "ConfigurationError",
    "Consumer",
    "ConsumerConfig",
    "Count",
    "Delivery",
    "DependencyFailed",
    "Envelope",
    "EventClock",
    "MalformedMessage",
    "Max",
    "Mean",
    "Message",
    "MessageTooLarge",
    "Min",
    "Pipeline",
    "Producer",
    "Reject",
    "Retry",
    "Service",
    "ServiceClient",
    "SessionWindow",
    "Settings",
    "SimulatedCamera",
    "SimulatedSensor",
    "SlidingWindow",
    "Stop",
    "Stream",
    "Sum",
    "SystemClock",
    "Task",
    "TaskError",
    "TaskFuture",
    "TaskInfo",
    "TaskNotFound",
    "TaskRefused",
    "TaskTimeout",
    "TaskstreamError",
    "TumblingWindow",
    "WorkerLost",
    "__version__",
    "as_completed",
    "broker_from_url",
    "gather",
]

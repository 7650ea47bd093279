"""Settings of the SQS backend: limits, :class:`SQSOptions` and the URL options that build it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from taskstream.constants import SQS_MAX_MESSAGE_BYTES
from taskstream.errors import ConfigurationError
from taskstream.settings import DEFAULT_MAX_ATTEMPTS
from taskstream.urloptions import Option, URLOptions

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "DEFAULT_WAIT_TIME",
    "HEADER_ALLOWANCE",
    "OPTIONS",
    "SQSOptions",
    "SQS_MAX_MESSAGE_BYTES",
    "visibility",
]

DEFAULT_VISIBILITY_TIMEOUT = 30.0
DEFAULT_WAIT_TIME = 20
DEFAULT_MAX_RECEIVES = 10
DEFAULT_MAX_CONNECTIONS = 50
#: What ``Capabilities.max_message_bytes`` keeps of a queue's limit for headers (a dead-letter reason too).
HEADER_ALLOWANCE = 8 * 1024
SQS_MIN_MESSAGE_BYTES = 1024
SQS_MAX_BATCH = 10
SQS_MAX_DELAY = 900
SQS_MAX_VISIBILITY = 12 * 3600
#: The FIFO message group of messages published without a key.
DEFAULT_GROUP = "default"
#: How long a publish is sent again while its requests reach SQS and lose the connection before the answer
#: (botocore's three attempts can all meet cuts in a row); an unreachable server fails after botocore's retries.
CUT_RETRY_WINDOW = 30.0
CUT_RETRY_PAUSE = 0.1
#: Pause after an empty short poll (``wait_time=0``), so an empty queue is not polled in a busy loop.
SHORT_POLL_PAUSE = 0.1

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class SQSOptions:
    """Settings of one :class:`~taskstream.brokers.sqs.SQSBroker` (``docs/brokers.md`` explains each).

    ``max_receive_count`` ``None`` means the runtime's ``max_attempts``
    (:data:`taskstream.settings.DEFAULT_MAX_ATTEMPTS` unless settings are passed to the broker).
    """

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    queue_prefix: str = ""
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    wait_time: int = DEFAULT_WAIT_TIME
    max_receives: int = DEFAULT_MAX_RECEIVES
    max_receive_count: int | None = None
    max_message_bytes: int = SQS_MAX_MESSAGE_BYTES
    create_queues: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    close_grace: float | None = None  # None: wait_time + 2

    def __post_init__(self) -> None:
        if not 0 < self.visibility_timeout <= SQS_MAX_VISIBILITY:
            raise ConfigurationError(
                f"visibility_timeout must be between 1 and {SQS_MAX_VISIBILITY} s, got {self.visibility_timeout}"
            )
        if not 0 <= self.wait_time <= 20:
            raise ConfigurationError(f"wait_time must be between 0 and 20 s (SQS long polling), got {self.wait_time}")
        if not SQS_MIN_MESSAGE_BYTES + HEADER_ALLOWANCE <= self.max_message_bytes <= SQS_MAX_MESSAGE_BYTES:
            raise ConfigurationError(
                f"max_message_bytes must be between {SQS_MIN_MESSAGE_BYTES + HEADER_ALLOWANCE} and "
                f"{SQS_MAX_MESSAGE_BYTES} (SQS MaximumMessageSize), got {self.max_message_bytes}"
            )
        if self.max_receive_count is not None and not 1 <= self.max_receive_count <= 1000:
            raise ConfigurationError(f"max_receive_count must be between 1 and 1000, got {self.max_receive_count}")
        if self.max_receives < 1 or self.max_connections < 1:
            raise ConfigurationError("max_receives and max_connections must be at least 1")
        if self.close_grace is not None and self.close_grace < 0:
            raise ConfigurationError(f"close_grace must not be negative, got {self.close_grace}")
        if self.queue_prefix and not QUEUE_NAME.match(self.queue_prefix):
            raise ConfigurationError(
                f"queue_prefix {self.queue_prefix!r} may hold only letters, digits, '-' and '_' (SQS queue names)"
            )

    def redrive_count(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> int:
        """``maxReceiveCount`` of created queues: ``max_receive_count``, else ``max_attempts`` (1 to 1000)."""
        if self.max_receive_count is not None:
            return self.max_receive_count
        return max(1, min(1000, max_attempts))

    def grace(self) -> float:
        """Seconds ``close()`` lets receives in flight finish: ``close_grace``, else ``wait_time + 2``."""
        return self.close_grace if self.close_grace is not None else self.wait_time + 2.0


OPTIONS = URLOptions(
    "SQS",
    [
        Option("endpoint_url", "str", None, "another SQS API server (moto, LocalStack); default: AWS"),
        Option("profile", "str", None, "AWS profile name from the config files"),
        Option("queue_prefix", "str", "", "prepended to every queue name (environments sharing one account)"),
        Option(
            "visibility_timeout",
            "duration",
            DEFAULT_VISIBILITY_TIMEOUT,
            "seconds a received message stays hidden (sent with every receive)",
        ),
        Option("wait_time", "int", DEFAULT_WAIT_TIME, "long-poll seconds per receive (0-20)"),
        Option("max_receives", "int", DEFAULT_MAX_RECEIVES, "most receives in flight per subscription"),
        Option("max_receive_count", "int", None, "RedrivePolicy maxReceiveCount of created queues"),
        Option("max_message_bytes", "int", SQS_MAX_MESSAGE_BYTES, "MaximumMessageSize of created queues"),
        Option("create_queues", "bool", True, "declare creates missing queues; false: look up only"),
        Option("max_connections", "int", DEFAULT_MAX_CONNECTIONS, "HTTP connection pool size"),
        Option("close_grace", "duration", None, "seconds close() waits for receives in flight (wait_time + 2)"),
    ],
)


def visibility(seconds: float) -> int:
    """Seconds as SQS takes them: whole, rounded up (never earlier than asked), at most 12 h."""
    return max(0, min(SQS_MAX_VISIBILITY, math.ceil(seconds)))

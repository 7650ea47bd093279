"""Every error taskstream raises, under one root.

The tree::

    TaskstreamError
    ├── ConfigurationError          bad URL, bad setting, unknown scheme
    │   └── MissingExtraError       a backend's optional dependency is not installed
    ├── BrokerError                 anything a broker driver raised, mapped at the boundary
    │   ├── BrokerConnectionError   cannot connect, or the connection is gone for good
    │   ├── PublishError            the broker did not take a message (nack, timeout, closed)
    │   ├── QueueNotFound           the queue does not exist and may not be created
    │   └── NotSupported            the backend cannot do this (see its Capabilities)
    ├── MessageError                a message that cannot be handled as it is
    │   ├── MalformedMessage        bytes that do not decode (never crashes a consumer)
    │   ├── MessageTooLarge         over the broker's size limit; says which limit
    │   ├── ValidationFailed        the body does not match the handler's annotation
    │   └── PayloadError            (taskstream.payloads) a claim-check payload cannot be used
    │       ├── PayloadMissing      the referenced blob is gone
    │       └── PayloadCorrupt      size or checksum does not match the reference
    ├── PayloadStoreError           (taskstream.payloads) the blob store cannot be reached; retried
    ├── HandlerControl              raised by handlers to steer acknowledgement
    │   ├── Reject                  dead-letter now, with this reason, no retries
    │   └── Retry                   requeue, optionally after a delay
    ├── TaskError                   (taskstream.tasks) a remote task failed; carries the remote traceback
    │   ├── TaskTimeout             the task ran past its timeout
    │   ├── DependencyFailed        an input future failed; the cause chain leads to the original error
    │   ├── TaskRefused             the worker refused it (unknown name, unsigned code)
    │   └── WorkerLost              the worker died while running it
    ├── TaskNotFound                (taskstream.tasks) no task with that id in the result store
    └── ResultStoreError            (taskstream.tasks) the result store failed

Errors marked with a module live there, next to the feature that raises them; they still derive from this root.

Driver exceptions are always chained (``raise BrokerError(...) from exc``) so the original is kept,
and messages never include credentials.
"""

from __future__ import annotations

__all__ = [
    "BrokerConnectionError",
    "BrokerError",
    "ConfigurationError",
    "HandlerControl",
    "MalformedMessage",
    "MessageError",
    "MessageTooLarge",
    "MissingExtraError",
    "NotSupported",
    "PublishError",
    "QueueNotFound",
    "Reject",
    "Retry",
    "TaskError",
    "TaskstreamError",
    "ValidationFailed",
]


class TaskstreamError(Exception):
    """Root of every taskstream error."""


class ConfigurationError(TaskstreamError):
    """A URL, setting or argument is wrong; the message says which and why."""


class MissingExtraError(ConfigurationError):
    """A backend's optional dependency is missing.

    The message names the ``pip install`` that fixes it.
    """

    def __init__(self, backend: str, extra: str, module: str) -> None:
        self.backend = backend
        self.extra = extra
        super().__init__(
            f"the {backend} backend needs the '{module}' package, which is not installed; "
            f"fix it with: pip install 'taskstream[{extra}]'"
        )


class BrokerError(TaskstreamError):
    """A broker operation failed. The driver's own exception is chained as ``__cause__``."""


class BrokerConnectionError(BrokerError):
    """The broker cannot be reached, or the connection was lost for good."""


class PublishError(BrokerError):
    """The broker did not accept a message."""


class QueueNotFound(BrokerError):
    """The queue does not exist and this broker was told not to create it."""


class NotSupported(BrokerError):
    """The backend cannot do what was asked; its ``Capabilities`` say so."""


class MessageError(TaskstreamError):
    """A message cannot be handled as it is. Consumers dead-letter it with ``str(error)`` as the reason."""


class MalformedMessage(MessageError):
    """Bytes that are not a valid message (not JSON, or a broken envelope)."""


class MessageTooLarge(MessageError):
    """An encoded message is over a broker's size limit."""

    def __init__(self, size: int, limit: int, broker: str) -> None:
        self.size = size
        self.limit = limit
        self.broker = broker
        super().__init__(
            f"message of {size} bytes is over the {broker} limit of {limit} bytes "
            "(send large payloads by reference: see taskstream.payloads)"
        )


class ValidationFailed(MessageError):
    """The message body does not match the handler's parameter annotation."""


class HandlerControl(TaskstreamError):
    """Base of the exceptions a handler raises to steer acknowledgement."""


class Reject(HandlerControl):
    """Raise in a handler to dead-letter the message at once with ``reason``; it is not retried."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Retry(HandlerControl):
    """Raise in a handler to requeue the message, after ``delay`` seconds when given.

    The attempt still counts toward ``max_attempts``.
    """

    def __init__(self, reason: str = "retry requested", delay: float | None = None) -> None:
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class TaskError(TaskstreamError):
    """A task failed remotely. ``remote_type`` and ``remote_traceback`` describe the original error."""

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "") -> None:
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        text = f"{remote_type}: {message}" if remote_type else message
        if remote_traceback:
            text = f"{text}\n\nRemote traceback:\n{remote_traceback}"
        super().__init__(text)

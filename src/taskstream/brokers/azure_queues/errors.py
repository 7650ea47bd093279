"""Azure SDK errors mapped onto taskstream's at one boundary, described without secrets; visibility seconds."""

from __future__ import annotations

import math
import re

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from taskstream.brokers.azure_queues.config import MAX_VISIBILITY
from taskstream.errors import BrokerConnectionError, BrokerError, ConfigurationError, QueueNotFound

__all__ = ["check_delay", "describe", "error_code", "is_transient", "map_error", "whole_seconds"]

_SECRET_PATTERNS = re.compile(r"(?i)(accountkey=|sig=|sharedaccesssignature=)[^;&\s]+")


def error_code(exc: BaseException) -> str:
    """Azure's error code of ``exc`` (``QueueNotFound``, ``PopReceiptMismatch``, ...), or ``""``."""
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    return str(code) if code else ""


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a driver error."""
    code = error_code(exc)
    status = getattr(exc, "status_code", None)
    if code or status:
        return f"{code or type(exc).__name__} (HTTP {status})" if status else code
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    scrubbed = _SECRET_PATTERNS.sub(r"\1***", first_line)[:300]
    return f"{type(exc).__name__}: {scrubbed}"


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the service unreachable, a 5xx, throttling (429)."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError | TimeoutError):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(exc, HttpResponseError) and (status is None or status >= 500 or status == 429)


def map_error(exc: BaseException, what: str, queue: str | None = None) -> BrokerError:
    """The taskstream error for a driver error while doing ``what`` (on ``queue``); the caller chains it."""
    detail = describe(exc)
    if isinstance(exc, ResourceNotFoundError) and error_code(exc) == "QueueNotFound":
        return QueueNotFound(f"{what}: Azure queue {queue!r} does not exist (declare it first)")
    if isinstance(exc, ClientAuthenticationError):
        return BrokerConnectionError(f"{what}: Azure refused the credential: {detail}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError | TimeoutError):
        return BrokerConnectionError(f"{what}: cannot reach Azure Storage: {detail}")
    return BrokerError(f"{what}: {detail}")


def check_delay(delay: float | None) -> None:
    """Refuse a delay over Azure's 7 days.

    Raises:
        ConfigurationError: the delay is too long.
    """
    if delay is not None and delay > MAX_VISIBILITY:
        raise ConfigurationError(f"a delay of {delay} s is over Azure's limit of 7 days ({MAX_VISIBILITY} s)")


def whole_seconds(value: float | None) -> int:
    """Whole seconds for Azure visibility values, never shorter than asked, within Azure's 7 days."""
    if value is None or value <= 0:
        return 0
    return min(MAX_VISIBILITY, math.ceil(value))

"""The SQS client: one aiobotocore client, driver errors mapped onto taskstream's, batched requests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from taskstream.brokers.sqs.config import SQS_MAX_BATCH, SQSOptions
from taskstream.errors import BrokerConnectionError, BrokerError, ConfigurationError, QueueNotFound
from taskstream.settings import redact_url

__all__ = ["AUTH_FAILED", "Batcher", "Entry", "SQSClient", "SQSError", "ignore_outcome", "is_gone", "was_cut"]

NOT_FOUND = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
AUTH_FAILED = {"InvalidClientTokenId", "SignatureDoesNotMatch", "UnrecognizedClientException", "ExpiredToken"}
GONE = {"ReceiptHandleIsInvalid", "MessageNotInflight", "InvalidParameterValue"}


class SQSError(BrokerError):
    """SQS refused a request (or one entry of a batch); ``code`` is SQS's error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def is_gone(exc: BaseException) -> bool:
    """The message is no longer ours to change (already visible again, or deleted)."""
    return isinstance(exc, BrokerError) and getattr(exc, "code", "") in GONE


def was_cut(exc: BaseException) -> bool:
    """A request reached SQS and lost its connection before the answer (a cut, not an unreachable server)."""
    from botocore.exceptions import ConnectionClosedError

    return isinstance(exc, BrokerConnectionError) and isinstance(exc.__cause__, ConnectionClosedError)


def ignore_outcome(future: asyncio.Future[None]) -> None:
    """A done-callback that retrieves a future's outcome, so asyncio does not report it."""
    if not future.cancelled():
        future.exception()


class SQSClient:
    """One aiobotocore SQS client; :meth:`call` maps driver errors at this one boundary.

    Credentials come from the AWS chain (environment, profile, instance role) and never appear in errors.
    """

    def __init__(self, options: SQSOptions) -> None:
        self.options = options
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def open(self) -> None:
        """Create the client (no request is made).

        Raises:
            ConfigurationError: botocore cannot set the client up (a bad region or endpoint, say).
        """
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError

        session = get_session()
        if self.options.profile:
            session.set_config_variable("profile", self.options.profile)
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.create_client(
                    "sqs",
                    region_name=self.options.region,
                    endpoint_url=self.options.endpoint_url,
                    config=AioConfig(
                        max_pool_connections=self.options.max_connections,
                        read_timeout=60,
                        retries={"mode": "standard"},
                    ),
                )
            )
        except BotoCoreError as exc:
            await stack.aclose()
            raise ConfigurationError(f"cannot set up the SQS client: {exc}") from exc
        self._stack = stack
        self._client = client

    async def aclose(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    async def call(self, operation: str, action: str, **kwargs: Any) -> Any:
        """Call one SQS operation, mapping driver errors onto taskstream's."""
        if self._client is None:
            raise BrokerConnectionError("SQS broker is not connected (use 'async with' or connect())")
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            NoRegionError,
        )

        try:
            return await getattr(self._client, operation)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "")) or str(error.get("QueryErrorCode", ""))
            message = error.get("Message", "")
            if code in NOT_FOUND or error.get("QueryErrorCode") == "QueueDoesNotExist":
                raise QueueNotFound(f"{action}: the SQS queue does not exist ({message})") from exc
            mapped = SQSError(f"{action} failed: SQS {code}: {message}", code)
            raise mapped from exc
        except NoCredentialsError as exc:
            raise ConfigurationError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                "(or profile= in the URL), or run with an instance role"
            ) from exc
        except NoRegionError as exc:
            raise ConfigurationError(
                "no AWS region: put it in the URL (sqs://us-east-1/) or set AWS_DEFAULT_REGION"
            ) from exc
        except (ConnectionError, HTTPClientError, OSError) as exc:
            where = redact_url(self.options.endpoint_url or "AWS")
            raise BrokerConnectionError(f"{action}: cannot reach SQS at {where}: {exc}") from exc
        except BotoCoreError as exc:
            raise BrokerError(f"{action} failed: {exc}") from exc


@dataclass(slots=True)
class Entry:
    """One request of a batch call, its size as SQS counts it, and the future its caller awaits."""

    request: dict[str, Any]
    size: int
    future: asyncio.Future[None]


@dataclass(slots=True)
class Batcher:
    """Coalesces single requests to one queue into batch calls of up to 10 entries.

    Adaptive: an entry is sent at once when fewer than ``max_in_flight`` calls are running; otherwise it waits
    and rides with the next call. Light load keeps its latency, heavy load gets full batches.
    """

    send: Callable[[list[Entry]], Awaitable[None]]
    max_bytes: int = 0  # total size of one call's entries (0: no limit)
    max_in_flight: int = 4
    pending: collections.deque[Entry] = field(default_factory=collections.deque)
    in_flight: int = 0
    scheduled: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def submit(self, request: dict[str, Any], size: int = 0) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(Entry(request, size, future))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)  # gather what arrives in this loop turn
        return future

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending and self.in_flight < self.max_in_flight:
            batch = [self.pending.popleft()]
            total = batch[0].size
            while self.pending and len(batch) < SQS_MAX_BATCH:
                nxt = self.pending[0]
                if self.max_bytes and total + nxt.size > self.max_bytes:
                    break
                batch.append(self.pending.popleft())
                total += nxt.size
            self.in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[Entry]) -> None:
        try:
            await self.send(batch)
        except BaseException as exc:
            for entry in batch:
                if not entry.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        entry.future.cancel()
                    else:
                        entry.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.in_flight -= 1
            if self.pending and not self.scheduled:
                self._flush()

    async def drain(self) -> None:
        while self.tasks or self.pending:
            if self.tasks:
                await asyncio.wait(set(self.tasks))
            elif self.pending and not self.scheduled:
                self._flush()
            else:
                await asyncio.sleep(0)

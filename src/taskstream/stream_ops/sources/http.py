"""HTTP polling as a source: GET a URL every ``interval`` seconds and emit what it returns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from taskstream.errors import ConfigurationError
from taskstream.settings import redact_url
from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch, is_stop

__all__ = ["HttpPollSource"]

log = logging.getLogger("taskstream.stream_ops.sources")


class HttpPollSource(Source):
    """Polls ``url``; a JSON list becomes that many items, any other JSON value one item.

    Args:
        url: what to GET.
        interval: seconds between polls.
        max_polls: stop after this many polls (``None``: poll until stopped or bounded).
        extract: turns the decoded JSON into the list of items (e.g. ``lambda doc: doc["readings"]``).
        headers: request headers.
        timeout: seconds one request may take.

    A failed request (connection error, non-2xx status, not JSON) is logged, counted in ``errors`` and retried
    at the next poll. A ``{"control": "stop"}`` response ends the source.
    """

    label = "http"

    def __init__(
        self,
        url: str,
        *,
        interval: float = 1.0,
        max_polls: int | None = None,
        extract: Callable[[Any], list[Any]] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
        **bounds: Any,
    ) -> None:
        super().__init__(**bounds)
        if interval < 0:
            raise ConfigurationError(f"HttpPollSource interval must be >= 0, got {interval}")
        self.url = url
        self.interval = interval
        self.max_polls = max_polls
        self.extract = extract
        self.headers = headers or {}
        self.timeout = timeout
        self.errors = 0
        self.polls = 0

    async def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        try:
            import aiohttp
        except ImportError as exc:  # pragma: no cover
            raise ConfigurationError("HttpPollSource needs aiohttp: pip install aiohttp") from exc
        emitted = 0
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            while self.max_polls is None or self.polls < self.max_polls:
                self.polls += 1
                doc: Any = None
                try:
                    async with session.get(self.url) as response:
                        response.raise_for_status()
                        doc = await response.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    self.errors += 1
                    log.warning("polling %s failed: %s: %s", redact_url(self.url), type(exc).__name__, exc)
                else:
                    if is_stop(doc):
                        return
                    items = self.extract(doc) if self.extract else (doc if isinstance(doc, list) else [doc])
                    for i in range(0, len(items), batch_size):
                        room = self.room(emitted, batch_size)
                        part = items[i : i + min(batch_size, room)]
                        if part:
                            emitted += len(part)
                            yield SourceBatch(part)
                        if self.room(emitted, 1) == 0:
                            return
                if self.max_polls is None or self.polls < self.max_polls:
                    await asyncio.sleep(self.interval)

"""JSON Lines files as a source, read once or followed like ``tail -f``."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from taskstream.stream_ops.runtime_context import RuntimeContext
from taskstream.stream_ops.sources.base import Source, SourceBatch, is_stop

__all__ = ["JsonLinesSource"]

log = logging.getLogger("taskstream.stream_ops.sources")

CHUNK = 1 << 20


class JsonLinesSource(Source):
    """One JSON value per line.

    Args:
        path: the file.
        follow: keep reading lines appended to the file (waiting ``poll_interval`` between looks) until a
            ``{"control": "stop"}`` line, ``max_items`` or ``idle_timeout``; a line still being written (no
            newline yet) waits for its end.
        from_end: with ``follow``, start at the current end of the file.
        poll_interval: seconds between looks for new data when following.

    Lines that are not JSON are logged and skipped (counted in ``bad_lines``); blank lines are ignored.
    """

    label = "jsonl"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        follow: bool = False,
        from_end: bool = False,
        poll_interval: float = 0.1,
        **bounds: Any,
    ) -> None:
        super().__init__(**bounds)
        self.path = Path(path)
        self.follow = follow
        self.from_end = from_end
        self.poll_interval = poll_interval
        self.bad_lines = 0

    resumable = True  # position: {"offset": bytes read up to the end of the batch's last line, "emitted": items}

    def batches(self, ctx: RuntimeContext, batch_size: int) -> AsyncIterator[SourceBatch]:
        return self.open_batches(ctx, batch_size)

    async def open_batches(
        self, ctx: RuntimeContext, batch_size: int, position: Any = None
    ) -> AsyncIterator[SourceBatch]:
        while self.follow and not self.path.exists():
            await asyncio.sleep(self.poll_interval)
        emitted = int(position["emitted"]) if position else 0
        pending = b""
        with open(self.path, "rb") as f:  # noqa: ASYNC230 - a local file; the reads below run on a thread
            if position:
                f.seek(int(position["offset"]))
            elif self.from_end:
                f.seek(0, os.SEEK_END)
            done = f.tell()  # the offset just after the last line looked at

            def batch(items: list[Any]) -> SourceBatch:
                return SourceBatch(items, position={"offset": done, "emitted": emitted})

            items: list[Any] = []
            while True:
                chunk = await asyncio.to_thread(f.read, CHUNK)
                if not chunk:
                    if items:
                        emitted += len(items)
                        yield batch(items)
                        items = []
                    if not self.follow:
                        if pending.strip():
                            value = self._parse(pending)
                            done += len(pending)
                            if value is not None and not is_stop(value) and self.room(emitted, 1):
                                emitted += 1
                                yield batch([value])
                        return
                    await asyncio.sleep(self.poll_interval)
                    continue
                data = pending + chunk
                lines = data.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    done += len(line) + 1
                    if not line.strip():
                        continue
                    value = self._parse(line)
                    if value is None:
                        continue
                    if is_stop(value):
                        if items:
                            emitted += len(items)
                            yield batch(items)
                        return
                    items.append(value)
                    room = self.room(emitted, batch_size)
                    if len(items) >= room:
                        emitted += len(items)
                        yield batch(items)
                        items = []
                        if self.room(emitted, 1) == 0:
                            return

    def _parse(self, line: bytes) -> Any:
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self.bad_lines += 1
            log.warning("%s: skipping a line that is not JSON (%s): %r", self.path, exc, line[:80])
            return None

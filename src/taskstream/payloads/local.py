"""A blob store in a local directory: the default, for producers and consumers on one host.

URL: ``file:///absolute/dir``. The default directory is ``$XDG_CACHE_HOME/taskstream/payloads``
(``~/.cache/taskstream/payloads``). Directories are created with mode ``0700``; each write goes to a
temporary file first and is renamed into place, so a reader never sees half a blob. File I/O runs on a
worker thread and never blocks the event loop.

The location references carry is ``file://<host name>/<dir>``: a consumer on another host reports that the
payload is out of its reach instead of reading a different machine's directory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar, Self

from taskstream.errors import ConfigurationError
from taskstream.payloads.base import BlobInfo, BlobStore, PayloadMissing, PayloadStoreError, StoreURL, check_key
from taskstream.urloptions import URLOptions

__all__ = ["LocalStore", "default_directory"]


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/taskstream/payloads``, else ``~/.cache/taskstream/payloads``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "taskstream" / "payloads"


class LocalStore(BlobStore):
    """Payload blobs as files under ``directory``.

    Example:
        >>> store = LocalStore("/tmp/taskstream-doc-payloads")
        >>> store.location.endswith("/tmp/taskstream-doc-payloads")
        True
    """

    name = "local"
    OPTIONS: ClassVar[URLOptions] = URLOptions("local payload store", [])  # a directory takes no options

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().resolve()
        self._location = f"file://{socket.gethostname()}{self.directory.as_posix()}"

    @classmethod
    def from_url(cls, url: StoreURL) -> Self:
        """``file:///absolute/dir`` (or ``file://localhost/...``): a directory on this host."""
        if url.netloc not in ("", "localhost"):
            raise ConfigurationError(
                f"local payload store URL {url.redacted!r} names host {url.netloc!r}; "
                "use file:///absolute/path (a local directory is reachable from this host only)"
            )
        if not url.path.startswith("/"):
            raise ConfigurationError(f"local payload store needs an absolute path: {url.redacted!r}")
        return cls(url.path)

    @property
    def location(self) -> str:
        return self._location

    def _path(self, key: str) -> Path:
        path = self.directory / check_key(key)
        if self.directory not in path.parents:
            raise PayloadMissing(f"blob key {key!r} is outside {self.directory}")
        return path

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._put, key, data)
        except OSError as exc:
            raise PayloadStoreError(f"cannot write payload {key!r} to {self.directory}: {exc.strerror}") from exc

    def _get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._get, key)
        except FileNotFoundError:
            raise PayloadMissing(f"payload {key!r} is not in {self.location}") from None
        except OSError as exc:
            raise PayloadStoreError(f"cannot read payload {key!r} from {self.directory}: {exc.strerror}") from exc

    def _delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Remove emptied sub-directories below the store's own directory.
        parent = path.parent
        while parent != self.directory and self.directory in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._delete, key)
        except OSError as exc:
            raise PayloadStoreError(f"cannot delete payload {key!r} in {self.directory}: {exc.strerror}") from exc

    def _list(self) -> list[BlobInfo]:
        # Consumers delete blobs (and their emptied day directories) while this walks: os.walk skips a directory
        # that vanished, and a file gone between listing and stat is simply not listed.
        found = []
        for folder, _dirs, files in os.walk(self.directory):
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append(BlobInfo(path.relative_to(self.directory).as_posix(), stat.st_size, stat.st_mtime))
        return found

    async def list(self) -> AsyncIterator[BlobInfo]:
        for info in await asyncio.to_thread(self._list):
            yield info

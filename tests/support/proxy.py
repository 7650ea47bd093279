"""A TCP proxy in front of a server, the way tests make a network fail.

* :meth:`TcpProxy.cut` aborts every live connection (a network failure); clients reconnect through the proxy.
* ``refuse = True`` aborts new connections as they arrive (a server that is down but whose port answers).
* :meth:`TcpProxy.down` stops listening and aborts everything; :meth:`TcpProxy.up` listens again on the same
  port, so a server whose state would not survive a real restart (moto keeps queues in memory) looks restarted.
"""

from __future__ import annotations

import asyncio

from tests.support.ports import free_port

__all__ = ["TcpProxy"]

_Link = tuple[asyncio.StreamWriter, asyncio.StreamWriter]


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = free_port()
        self.refuse = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        """Listen on :attr:`port` (the same port after every :meth:`down`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    async def stop(self) -> None:
        """:meth:`down`, and wait for every forwarding task to end."""
        await self.down()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        """Abort every connection through the proxy, as a network failure would."""
        self.cuts += 1
        for link in list(self._links):
            for side in link:
                side.transport.abort()
        self._links.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        link = (client_writer, server_writer)
        self._links.add(link)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            for side in link:
                side.transport.abort()
            self._links.discard(link)

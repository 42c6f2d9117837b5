"""A loopback TCP proxy that a test can cut and restore, to take a broker away from its clients.

While cut, every open connection is reset and new ones are reset as soon as they are
accepted: clients see the same thing as a refused connection (the listening socket stays
bound, so ``restore()`` never has to win its port back from another process). While answers
are dropped, requests still reach the server but nothing comes back: what a client asked is
done, and it cannot know (a network cut between a request and its answer).
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``host:port`` (a free loopback port by default) to ``target_host:target_port``."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._server: asyncio.Server | None = None
        self._open = True
        self._dropping = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The listening port (valid after start())."""
        if self._server is None:
            raise RuntimeError("TcpProxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        """``host:port`` to give clients."""
        return f"{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        """True between cut() and restore()."""
        return not self._open

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)

    async def stop(self) -> None:
        """Stop listening, reset every connection and wait for the pipes to end."""
        if self._server is not None:
            self._server.close()
        self._reset_all()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self) -> int:
        """Reset every open connection, and each new one, until restore(); returns how many were open."""
        self._open = False
        return self._reset_all()

    def restore(self) -> None:
        """Forward new connections again, answers included."""
        self._open = True
        self._dropping = False

    def drop_answers(self) -> None:
        """Forward what clients send but drop what the server answers, until ``cut()`` and ``restore()``."""
        self._dropping = True

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _reset_all(self) -> int:
        """Reset both ends of every open connection; returns how many connections that was."""
        writers, self._writers = self._writers, set()
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self._open:
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        if not self._open:  # cut while connecting upstream
            client_writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}
        pipes = [
            asyncio.create_task(self._pipe(client_reader, upstream_writer)),
            asyncio.create_task(self._pipe(upstream_reader, client_writer, answers=True)),
        ]
        self._pipes.update(pipes)
        try:
            # Either direction ending ends the connection: Kafka does not half-close.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for writer in (client_writer, upstream_writer):
                self._writers.discard(writer)
                writer.transport.abort()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool = False
    ) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(_CHUNK):
                if answers and self._dropping:
                    continue  # the connection is reset before it carries anything again
                writer.write(chunk)
                await writer.drain()

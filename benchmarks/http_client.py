"""A lean HTTP/1.1 client for load generation on the same 2 cores as the server under test.

aiohttp spent 180-270 us of CPU per request here (benchmarks/overload.py reports it), CPU that the model then lacks:
at 3x a service's capacity that is a fifth of a core. This client does only what a load generator needs: keep-alive
connections from a pool, one pre-built request written whole, the status line and headers parsed for status,
Content-Length and Retry-After. No redirects, no chunked bodies, no TLS: it talks to our own loopback gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None
    body: bytes


class LeanClient:
    def __init__(self, host: str, port: int, headers: Mapping[str, str] | None = None) -> None:
        self._host, self._port = host, port
        self._extra_headers = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    def request(self, path: str, body: bytes) -> bytes:
        """The bytes of a POST of ``body`` (JSON) to ``path``, with the client's extra ``headers`` (an API key):
        build once, send many times."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{self._extra_headers}\r\n")
        return head.encode() + body

    async def send(self, request: bytes) -> Answer:
        """Send a request built by ``request``; raises OSError (or asyncio.IncompleteReadError) on a broken
        connection, which is then closed. A kept-alive connection that the server had closed while it was idle
        (uvicorn closes them after 5 s) is retried once on a new one, as browsers and aiohttp do."""
        if self._idle:
            try:
                return await self._send_on(*self._idle.pop(), request)
            except (asyncio.IncompleteReadError, ConnectionResetError) as error:
                if isinstance(error, asyncio.IncompleteReadError) and error.partial:
                    raise  # the server had begun to answer: not a stale connection
        return await self._send_on(*await self._connect(), request)

    async def _send_on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Answer:
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, retry_after, keep_alive = _parse_head(head)
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            writer.close()
            raise
        if keep_alive:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return Answer(status, retry_after, body)

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
        self._idle.clear()
        self._all.clear()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self._host, self._port, limit=1 << 20)
        self._all.append(writer)
        return reader, writer


def _parse_head(head: bytes) -> tuple[int, int, str | None, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, retry_after, keep_alive = 0, None, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            retry_after = value.strip().decode()
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
    return status, length, retry_after, keep_alive

"""The gateway's client for its one hot call: POST a JSON body to a vLLM replica, relay the answer.

Why not httpx here: profiling the gateway (docs/benchmarks.md, "Where the gateway's time goes")
put about 40 % of its Python time in httpx's request path: headers and body sent as two socket
writes, connection-pool bookkeeping that polls each idle socket before reuse, cookie handling,
and a cancel scope plus an h11 event per streamed chunk. This client does only what the gateway
needs: one write per request, responses parsed by httptools (C, already uvicorn's parser),
keep-alive connections per replica reused last-in first-out, and the body handed over in
whatever pieces have arrived (several SSE events at once under load, so fewer writes
downstream). httpx stays for everything off the hot path (health checks, adapter loads).

What it deliberately does not do: redirects, cookies, proxies, compression, TLS options beyond
the default context, HTTP/2. A replica is an internal service speaking plain HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


class UpstreamError(ConnectionError):
    """The replica could not be reached or broke the connection (not an HTTP error status)."""


class UpstreamTimeout(UpstreamError):
    pass


class CallerLeft(UpstreamError):
    """The request was abandoned because the gateway's own caller went away."""


# Stop reading from the socket while this much body is waiting to be relayed (backpressure
# from a slow client); resume below half of it.
_HIGH_WATER = 1 << 20


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight, answers parsed as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: Exception | None = None
        self._abandon: asyncio.Future[Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.received_any = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the replica tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed answer from the replica: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is None and self.headers_done and not self.complete and self._ends_at_close():
            self.complete = True  # a body without length or chunks ends when the socket does
        if not self.complete and self.error is None:
            self.error = UpstreamError(
                f"the replica closed the connection{f' ({exc})' if exc else ''}"
            )
        self._wake()

    def _ends_at_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def pause_writing(self) -> None:  # a request body never outgrows the kernel buffer here
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request (a broken replica): it is not part of the first,
            # and the connection is never reused.
            self.keep_alive = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Asked now: once the message is complete the parser has reset and answers False.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return  # (the body of a second answer: see on_message_begin)
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # ---- used by the pool and the response --------------------------------------------

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until something new arrives (headers, body, the end, or an error)."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        finally:
            timer.cancel()

    def watch(self, abandon: asyncio.Future[Any]) -> None:
        """Fail this request with ``CallerLeft`` if ``abandon`` completes before it is over."""
        if abandon.done():
            self._abandoned(abandon)
        else:
            abandon.add_done_callback(self._abandoned)
            self._abandon = abandon

    def unwatch(self) -> None:
        """Called before the connection can serve another request."""
        if self._abandon is not None:
            self._abandon.remove_done_callback(self._abandoned)
            self._abandon = None

    def _abandoned(self, abandon: asyncio.Future[Any]) -> None:
        if not abandon.cancelled() and not self.complete:
            self._fail(CallerLeft("the caller went away"))

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
        return data

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self.error = None
        self.transport.write(data)

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and self.keep_alive
            and not self.chunks
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"the replica sent nothing for {timeout:g} s"))


class UpstreamResponse:
    """An answer whose headers have arrived; read it all or iterate over its body."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int], conn: _Connection) -> None:
        self._pool = pool
        self._key = key
        self._conn: _Connection | None = conn
        self.status_code = conn.status
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in conn.headers]

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded), several pieces joined when they
        are already waiting."""
        conn = self._conn
        assert conn is not None, "the response was already closed"
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            await conn.wait(self._pool.read_timeout)

    async def aread(self) -> bytes:
        parts = [piece async for piece in self.aiter_raw()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.unwatch()
        if conn.reusable:
            self._pool._release(self._key, conn)
        else:
            conn.close()


class UpstreamPool:
    """Keep-alive connections to each replica, opened on demand, reused most recent first."""

    def __init__(
        self,
        *,
        read_timeout: float,
        connect_timeout: float = 5.0,
        max_idle_per_host: int = 256,
    ) -> None:
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[tuple[str, str, int], str, bytes]] = {}

    def _target(self, url: str) -> tuple[tuple[str, str, int], str, bytes]:
        """(scheme, host, port), the request path, and the Host header, cached per URL."""
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamError(f"not an http(s) URL: {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc.rpartition("@")[2]
            found = ((parts.scheme, parts.hostname, port), path, host.encode("idna"))
            if len(self._targets) < 10_000:
                self._targets[url] = found
        return found

    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        *,
        abandon: asyncio.Future[Any] | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` and wait for the answer's headers.

        A connection reused from the pool may have been closed by the replica while idle; if it
        fails before a single byte of answer arrived, the request is sent again once on a fresh
        connection (the replica never saw it). Any other failure raises ``UpstreamError``.

        When ``abandon`` completes (not cancelled) before the answer is complete, the
        connection is closed (the replica stops generating) and whoever waits on the answer,
        here or while reading it, gets ``CallerLeft``.
        """
        key, path, host = self._target(url)
        head = [f"POST {path} HTTP/1.1\r\n".encode(), b"host: ", host, b"\r\n"]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(f"content-length: {len(body)}\r\n\r\n".encode())
        message = b"".join(head) + body
        if abandon is not None and abandon.done() and not abandon.cancelled():
            # Gone already (while its adapter was being placed, say): nothing is sent.
            raise CallerLeft("the caller went away")
        while True:
            conn, reused = await self._acquire(key)
            try:
                conn.send(message)
                if abandon is not None:
                    conn.watch(abandon)
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except UpstreamError as exc:
                conn.close()
                retry = not isinstance(exc, (UpstreamTimeout, CallerLeft))
                if reused and not conn.received_any and retry:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, key, conn)

    async def _acquire(self, key: tuple[str, str, int]) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        return await self._connect(key), False

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ssl_context: Any = ssl.create_default_context() if scheme == "https" else None
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host, port, ssl=ssl_context),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(
                f"cannot connect to {host}:{port}: {exc or type(exc).__name__}"
            ) from exc
        return protocol

    def _release(self, key: tuple[str, str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_host:
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

"""The gateway's upstream HTTP/1.1 client against small scripted servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
import uvloop

from serving.upstream import CallerLeft, UpstreamError, UpstreamPool, UpstreamTimeout
from tests.unit.serving.scripted import read_request

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Loop:
    """Runs each test on the event loop of the current parameter (the gateway runs on uvloop)."""

    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop

    def run(self, coro: Awaitable[None]) -> None:
        with asyncio.Runner(loop_factory=self.factory) as runner:
            runner.run(coro)  # type: ignore[arg-type]


_LOOP = _Loop()


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def _event_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    _LOOP.factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    yield
    _LOOP.factory = asyncio.new_event_loop


async def _serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    """A server running ``handler`` per connection; the list counts connections accepted."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1/chat/completions", accepted


async def _echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        answer = head.split(b"\r\n")[0] + b"|" + body
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        writer.write(b"content-length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()


def test_posts_the_body_and_reuses_one_keep_alive_connection() -> None:
    async def run() -> None:
        server, url, accepted = await _serve(_echo_forever)
        pool = UpstreamPool(read_timeout=5)
        try:
            for n in range(3):
                response = await pool.post(url, b'{"n": %d}' % n, {"x-test": "1"})
                assert response.status_code == 200
                assert ("content-type", "application/json") in response.headers
                assert await response.aread() == b'POST /v1/chat/completions HTTP/1.1|{"n": %d}' % n
                await response.aclose()
            assert len(accepted) == 1
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_streams_chunked_answers_piece_by_piece() -> None:
    async def run() -> None:
        go = asyncio.Event()

        async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"6\r\ndata:1\r\n")
            await writer.drain()
            await go.wait()
            writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")
            await writer.drain()
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            await reader.read()

        server, url, accepted = await _serve(chunked)
        pool = UpstreamPool(read_timeout=5)
        try:
            response = await pool.post(url, b"{}", {})
            pieces = response.aiter_raw()
            assert await pieces.__anext__() == b"data:1"
            go.set()
            assert [piece async for piece in pieces] == [b"data:2"]
            await response.aclose()
            again = await pool.post(url, b"{}", {})  # the connection went back to the pool
            assert await again.aread() == b""
            await again.aclose()
            assert len(accepted) == 1
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_a_connection_the_replica_closed_while_idle_is_replaced_silently() -> None:
    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # Close without "connection: close": the client still thinks the connection is alive.

    async def run() -> None:
        server, url, accepted = await _serve(once_then_close)
        pool = UpstreamPool(read_timeout=5)
        try:
            for _ in range(3):
                response = await pool.post(url, b"{}", {})
                assert await response.aread() == b"ok"
                await response.aclose()
                await asyncio.sleep(0.05)
            assert len(accepted) == 3
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_a_body_without_length_ends_with_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\nboom")
        await writer.drain()

    async def run() -> None:
        server, url, _ = await _serve(until_close)
        pool = UpstreamPool(read_timeout=5)
        try:
            response = await pool.post(url, b"{}", {})
            assert response.status_code == 500
            assert await response.aread() == b"boom"
            await response.aclose()
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


@pytest.mark.parametrize(
    "answer",
    [b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"],
    ids=["closed-before-answer", "not-http", "truncated-body"],
)
def test_broken_answers_raise_upstream_error(answer: bytes) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def run() -> None:
        server, url, _ = await _serve(broken)
        pool = UpstreamPool(read_timeout=5)
        try:
            with pytest.raises(UpstreamError):
                response = await pool.post(url, b"{}", {})
                await response.aread()
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_silence_past_the_read_timeout_raises() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async def run() -> None:
        server, url, _ = await _serve(silent)
        pool = UpstreamPool(read_timeout=0.2)
        try:
            with pytest.raises(UpstreamTimeout):
                await pool.post(url, b"{}", {})
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_a_refused_connection_raises_upstream_error() -> None:
    async def run() -> None:
        server, url, _ = await _serve(_echo_forever)
        server.close()
        await server.wait_closed()
        pool = UpstreamPool(read_timeout=1)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.post(url, b"{}", {})

    _LOOP.run(run())


def test_a_response_closed_before_its_end_is_not_reused() -> None:
    async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def run() -> None:
        server, url, accepted = await _serve(slow_stream)
        pool = UpstreamPool(read_timeout=5)
        try:
            first = await pool.post(url, b"{}", {})
            assert await first.aiter_raw().__anext__() == b"a"
            await first.aclose()  # the caller went away mid-stream
            second = await pool.post(url, b"{}", {})
            assert await second.aread() == b"a"
            await second.aclose()
            assert len(accepted) == 2
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_a_timeout_on_a_reused_connection_is_not_sent_again() -> None:
    requests: list[bytes] = []

    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        requests.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        head, _ = await read_request(reader)
        requests.append(head)
        await reader.read()  # then silence

    async def run() -> None:
        server, url, accepted = await _serve(answers_once)
        pool = UpstreamPool(read_timeout=0.3)
        try:
            first = await pool.post(url, b"{}", {})
            await first.aread()
            await first.aclose()
            with pytest.raises(UpstreamTimeout):
                await pool.post(url, b"{}", {})
            await asyncio.sleep(0.1)
            assert len(requests) == 2 and len(accepted) == 1
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_an_abandoned_request_closes_its_connection_and_raises_caller_left() -> None:
    async def run() -> None:
        peer_closed = asyncio.Event()

        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await reader.read()  # generating... until the gateway closes the connection
            peer_closed.set()

        server, url, _ = await _serve(slow)
        pool = UpstreamPool(read_timeout=30)
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            waiting = asyncio.ensure_future(pool.post(url, b"{}", {}, abandon=left))
            await asyncio.sleep(0.05)
            left.set_result(None)  # the caller went away
            with pytest.raises(CallerLeft):
                await waiting
            await asyncio.wait_for(peer_closed.wait(), 5)
            # A cancelled watcher (the normal end of a request) abandons nothing.
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.cancel()
            server2, url2, _ = await _serve(_echo_forever)
            response = await pool.post(url2, b"{}", {}, abandon=done)
            assert (await response.aread()).endswith(b"|{}")
            await response.aclose()
            server2.close()
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_a_caller_gone_before_the_request_is_sent_sends_nothing() -> None:
    async def run() -> None:
        server, url, accepted = await _serve(_echo_forever)
        pool = UpstreamPool(read_timeout=5)
        left: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        left.set_result(None)
        try:
            with pytest.raises(CallerLeft):
                await pool.post(url, b"{}", {}, abandon=left)
            await asyncio.sleep(0.05)
            assert accepted == []  # not even a connection
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())


def test_a_second_answer_to_one_request_is_not_part_of_the_first() -> None:
    async def run() -> None:
        connections: list[int] = []

        async def twice_then_echo(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            connections.append(1)
            if len(connections) > 1:
                await _echo_forever(reader, writer)
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!")
            await writer.drain()
            await reader.read()

        server, url, accepted = await _serve(twice_then_echo)
        pool = UpstreamPool(read_timeout=5)
        try:
            response = await pool.post(url, b"{}", {})
            assert await response.aread() == b"ok"
            await response.aclose()
            # The connection that carried two answers is not reused for the next request.
            response = await pool.post(url, b'{"n": 2}', {})
            assert (await response.aread()).endswith(b'|{"n": 2}')
            await response.aclose()
            assert len(accepted) == 2
        finally:
            await pool.aclose()
            server.close()

    _LOOP.run(run())

"""Real HTTP servers on loopback for the webhook delivery tests.

A :class:`LoopbackServer` listens on ``127.0.0.1`` and, when the machine has IPv6, on ``::1``
with the same port, so every loopback spelling of a URL reaches it. It counts TCP connections as
well as requests: a canary must see zero of both.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Behaviour:
    """How the server answers; tests tweak it."""

    slow_s: float = 3.0
    redirect_to: str = "/"
    big_bytes: int = 8 * 1024 * 1024
    drip_s: float = 5.0


@dataclass
class _State:
    behaviour: Behaviour = field(default_factory=Behaviour)
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server_version = "loopback-test"
    state: _State  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.requests.append(
                Received(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
            )
        behaviour = self.state.behaviour
        path = self.path.split("?", 1)[0]
        if path == "/fail":
            self._reply(500, b"boom: something broke")
        elif path == "/gone":
            self._reply(410, b"gone")
        elif path == "/slow":
            time.sleep(behaviour.slow_s)
            self._reply(200, b"late")
        elif path == "/redirect":
            self._reply(302, b"", {"Location": behaviour.redirect_to})
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(behaviour.big_bytes))
            self.end_headers()
            chunk = b"x" * 65536
            for _ in range(behaviour.big_bytes // len(chunk)):
                self.wfile.write(chunk)
        elif path == "/drip":
            # A status line, then one header byte at a time: each read is quick, the whole
            # answer never completes. Only a total deadline stops the client.
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            self.wfile.flush()
            end = time.monotonic() + behaviour.drip_s
            while time.monotonic() < end:
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.05)
        else:
            self._reply(200, b"ok")

    def handle_one_request(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            super().handle_one_request()

    do_POST = _handle
    do_GET = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.state.lock:
            self.state.connections += 1
        return conn, addr


class _Server6(_Server):
    address_family = socket.AF_INET6


class LoopbackServer:
    def __init__(self) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._servers: list[_Server] = []
        for _attempt in range(20):
            v4 = _Server(("127.0.0.1", 0), handler)
            port = v4.server_address[1]
            try:
                v6: _Server | None = _Server6(("::1", port), handler)
            except OSError:
                v6 = None
                if socket.has_ipv6 and _ipv6_loopback_works():
                    v4.server_close()
                    continue  # port taken on ::1; try another
            self._servers = [s for s in (v4, v6) if s is not None]
            break
        else:  # pragma: no cover
            raise RuntimeError("could not bind a loopback port on both 127.0.0.1 and ::1")
        self.port = int(port)
        for server in self._servers:
            server.state = self.state
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in self._servers
        ]
        for thread in self._threads:
            thread.start()

    @property
    def behaviour(self) -> Behaviour:
        return self.state.behaviour

    @property
    def connections(self) -> int:
        with self.state.lock:
            return self.state.connections

    @property
    def requests(self) -> list[Received]:
        with self.state.lock:
            return list(self.state.requests)

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def loopback_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    try:
        yield server
    finally:
        server.close()

"""Fixtures for the webhook tests: loopback servers and a fake resolver."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.webhooks.servers import LoopbackServer, loopback_server


@pytest.fixture
def canary() -> Iterator[LoopbackServer]:
    """A server that must never be reached: it counts connections and requests."""
    with loopback_server() as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[LoopbackServer]:
    """A webhook receiver on loopback (reachable only through the allow list)."""
    with loopback_server() as server:
        yield server


class FakeDNS:
    """``socket.getaddrinfo`` answering for a few made-up names; others go to the real one.

    ``answers[name]`` is a list of answers, one per call (the last one repeats), each a list of
    IP strings. ``calls[name]`` counts the look-ups.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self.answers: dict[str, list[list[str]]] = {}
        self.calls: Counter[str] = Counter()

    def add(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return self._real(host, port, *args, **kwargs)
        self.calls[name] += 1
        seq = self.answers[name]
        ips = seq[min(self.calls[name] - 1, len(seq) - 1)]
        out = []
        for ip in ips:
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, int(port), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))))
        return out


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    dns = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns

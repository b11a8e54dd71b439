"""SafeWebhookClient against real HTTP servers on loopback.

The canary is a real server on 127.0.0.1 and ::1: with the allow list off, no hostile URL may
open even a TCP connection to it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import pytest

from common.webhooks.ssrf import DeliveryResult, SafeWebhookClient
from tests.fixtures.hostile_urls import HOSTILE_URLS, etc_hosts_loopback_names
from tests.unit.webhooks.conftest import FakeDNS
from tests.unit.webhooks.servers import LoopbackServer

BODY = b'{"type": "fine_tuning.job.succeeded"}'
HEADERS = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000"}


def _post(client: SafeWebhookClient, url: str) -> DeliveryResult:
    return client.post(url, BODY, HEADERS)


def test_hostile_urls_never_reach_the_canary(canary: LoopbackServer) -> None:
    urls = [h.render(canary.port) for h in HOSTILE_URLS]
    urls += [f"http://{name}:{canary.port}/" for name in etc_hosts_loopback_names()]
    urls += [f"https://{name}:{canary.port}/" for name in etc_hosts_loopback_names()]
    with SafeWebhookClient(timeout=2.0) as client:
        for url in urls:
            result = _post(client, url)
            assert not result.ok, url
            assert result.status_code is None, url
            assert result.error is not None
            assert result.error.startswith("refused: "), (url, result.error)
    assert canary.connections == 0
    assert canary.requests == []


def test_the_canary_is_reachable_through_the_allow_list(canary: LoopbackServer) -> None:
    """The control for the test above: the same server does count a request."""
    with SafeWebhookClient(allow_hosts="127.0.0.1") as client:
        result = _post(client, f"http://127.0.0.1:{canary.port}/")
    assert result.ok, result
    assert canary.connections == 1
    assert len(canary.requests) == 1


def test_redirect_to_loopback_is_not_followed(
    canary: LoopbackServer, receiver: LoopbackServer
) -> None:
    receiver.behaviour.redirect_to = f"http://127.0.0.1:{canary.port}/"
    with SafeWebhookClient(allow_hosts="localhost") as client:
        result = _post(client, f"http://localhost:{receiver.port}/redirect")
    assert result.status_code == 302
    assert not result.ok
    assert result.error is not None
    assert "redirect" in result.error
    assert "not followed" in result.error
    assert len(receiver.requests) == 1
    assert canary.connections == 0


def test_2xx_is_ok_and_headers_and_body_arrive(receiver: LoopbackServer) -> None:
    with SafeWebhookClient(allow_hosts="127.0.0.1,localhost") as client:
        result = _post(client, f"http://localhost:{receiver.port}/hook?x=1")
    assert result.ok
    assert result.status_code == 200
    assert result.error is None
    assert result.response_excerpt == "ok"
    assert result.address == "127.0.0.1"
    assert result.duration_ms > 0
    (request,) = receiver.requests
    assert request.method == "POST"
    assert request.path == "/hook?x=1"
    assert request.body == BODY
    headers = request.headers
    assert headers["host"] == f"localhost:{receiver.port}"
    assert headers["webhook-id"] == "msg_1"
    assert headers["content-type"] == "application/json"


def test_host_header_is_the_original_host_and_port(receiver: LoopbackServer) -> None:
    with SafeWebhookClient(allow_hosts="127.0.0.1") as client:
        assert _post(client, f"http://0x7f.1:{receiver.port}/").ok
        assert client.post(f"http://127.0.0.1:{receiver.port}/", BODY, {"Host": "evil.example"}).ok
    hosts = [r.headers.get("host") for r in receiver.requests]
    assert hosts == [f"127.0.0.1:{receiver.port}", f"127.0.0.1:{receiver.port}"]


@pytest.mark.parametrize(("path", "status"), [("/fail", 500), ("/gone", 410)])
def test_error_status_is_a_failure_with_excerpt(
    receiver: LoopbackServer, path: str, status: int
) -> None:
    with SafeWebhookClient(allow_hosts="127.0.0.1") as client:
        result = _post(client, f"http://127.0.0.1:{receiver.port}{path}")
    assert result.status_code == status
    assert not result.ok
    assert result.error == f"receiver answered HTTP {status}"
    assert result.response_excerpt in ("boom: something broke", "gone")


def test_slow_receiver_times_out(receiver: LoopbackServer) -> None:
    receiver.behaviour.slow_s = 3.0
    started = time.monotonic()
    with SafeWebhookClient(allow_hosts="127.0.0.1", timeout=0.5) as client:
        result = _post(client, f"http://127.0.0.1:{receiver.port}/slow")
    assert time.monotonic() - started < 2.5
    assert result.status_code is None
    assert not result.ok
    assert result.error is not None
    assert "timeout" in result.error


def test_trickling_receiver_hits_the_total_deadline(receiver: LoopbackServer) -> None:
    receiver.behaviour.drip_s = 5.0
    started = time.monotonic()
    with SafeWebhookClient(allow_hosts="127.0.0.1", timeout=1.0) as client:
        result = _post(client, f"http://127.0.0.1:{receiver.port}/drip")
    assert time.monotonic() - started < 3.0
    assert result.status_code is None
    assert result.error is not None
    assert "timeout" in result.error


@pytest.mark.parametrize("limit", [4096, 1000])
def test_big_response_is_truncated_and_returns_quickly(
    receiver: LoopbackServer, limit: int
) -> None:
    started = time.monotonic()
    with SafeWebhookClient(allow_hosts="127.0.0.1", max_response_bytes=limit) as client:
        result = _post(client, f"http://127.0.0.1:{receiver.port}/big")
    assert time.monotonic() - started < 2.0
    assert result.ok
    assert result.response_excerpt == "x" * limit


def test_default_limit_is_4096(receiver: LoopbackServer) -> None:
    client = SafeWebhookClient(allow_hosts="127.0.0.1")
    try:
        assert client.max_response_bytes == 4096
        assert client.timeout == 15.0
    finally:
        client.close()


def test_connection_refused_is_a_result_not_an_exception() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with SafeWebhookClient(allow_hosts="127.0.0.1") as client:
        result = _post(client, f"http://127.0.0.1:{port}/")
    assert result.status_code is None
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith("connect error (127.0.0.1)")


def test_tls_is_verified_against_the_original_name(receiver: LoopbackServer) -> None:
    """https to a plain-HTTP (or wrongly certified) server fails cleanly."""
    with SafeWebhookClient(allow_hosts="localhost", timeout=3.0) as client:
        result = _post(client, f"https://localhost:{receiver.port}/")
    assert not result.ok
    assert result.status_code is None
    assert result.error is not None


# --- DNS: resolve once, pin the connection ---------------------------------------------------


def test_allow_listed_name_resolved_once_and_pinned(
    fake_dns: FakeDNS, receiver: LoopbackServer
) -> None:
    fake_dns.add("hooks.example.test", ["127.0.0.1"], ["10.9.9.9"])
    with SafeWebhookClient(allow_hosts="hooks.example.test") as client:
        result = _post(client, f"http://hooks.example.test:{receiver.port}/pinned")
    assert result.ok, result
    assert fake_dns.calls["hooks.example.test"] == 1
    (request,) = receiver.requests
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"


def test_next_address_tried_on_connect_error(fake_dns: FakeDNS, receiver: LoopbackServer) -> None:
    # Nothing listens on 127.0.0.3:<port>: refused, then 127.0.0.1 answers.
    fake_dns.add("multi.example.test", ["127.0.0.3", "127.0.0.1"])
    with SafeWebhookClient(allow_hosts="multi.example.test") as client:
        result = _post(client, f"http://multi.example.test:{receiver.port}/")
    assert result.ok, result
    assert result.address == "127.0.0.1"
    assert len(receiver.requests) == 1


def test_rebinding_after_creation_is_refused_at_delivery(
    fake_dns: FakeDNS, canary: LoopbackServer
) -> None:
    from common.webhooks.ssrf import check_url

    fake_dns.add("rebind.example.test", ["93.184.216.34"], ["127.0.0.1"])
    url = f"https://rebind.example.test:{canary.port}/"
    assert check_url(url).addresses == ["93.184.216.34"]  # creation: looks public
    with SafeWebhookClient() as client:
        result = _post(client, url)  # delivery: now points at loopback
    assert result.error == ("refused: host 'rebind.example.test' resolves to a loopback address")
    assert canary.connections == 0


def test_connection_goes_to_the_checked_address_not_a_new_lookup(
    fake_dns: FakeDNS, canary: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivery check sees a public address; any later lookup would say loopback."""
    fake_dns.add("pin.example.test", ["93.184.216.34"], ["127.0.0.1"])
    attempts: list[tuple[Any, ...]] = []
    real_create_connection = socket.create_connection

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append(address)
        if address[0] == "93.184.216.34":  # no internet here: refuse instead of waiting
            raise ConnectionRefusedError(111, "Connection refused")
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    with SafeWebhookClient(timeout=2.0) as client:
        result = _post(client, f"https://pin.example.test:{canary.port}/")
    assert attempts == [("93.184.216.34", canary.port)]
    assert fake_dns.calls["pin.example.test"] == 1
    assert not result.ok
    assert result.error is not None
    assert "93.184.216.34" in result.error
    assert canary.connections == 0


def test_request_is_built_for_the_ip_with_host_and_sni(
    fake_dns: FakeDNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns.add("hooks.example.test", ["93.184.216.34"])
    sent: list[httpx.Request] = []

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        sent.append(request)
        assert kwargs.get("stream") is True
        assert self.follow_redirects is False
        return httpx.Response(204, request=request, stream=httpx.ByteStream(b""))

    monkeypatch.setattr(httpx.Client, "send", send)
    with SafeWebhookClient() as client:
        first = _post(client, "https://hooks.example.test:8443/in?a=1")
        second = _post(client, "https://hooks.example.test/in")
        third = _post(client, "https://93.184.216.34/in")
    assert first.ok
    assert second.ok
    assert third.ok
    assert str(sent[0].url) == "https://93.184.216.34:8443/in?a=1"
    assert sent[0].headers["host"] == "hooks.example.test:8443"
    assert sent[0].extensions["sni_hostname"] == "hooks.example.test"
    assert sent[1].headers["host"] == "hooks.example.test"
    assert "sni_hostname" not in sent[2].extensions
    assert sent[2].headers["host"] == "93.184.216.34"

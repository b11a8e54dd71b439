"""The parity check's verdicts and the signed internal calls (a fake gateway: error paths)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from common.internal_auth import sign, verify
from workers.jobs import parity

SECRET = "s" * 32
SAMPLE = {
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 4,
    "text": "ab\ufffd",
    "token_ids": [5, 6, 7],
}


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"x": 1}'
    headers = sign(SECRET, body, now=1000)
    assert verify(SECRET, body, headers, now=1010)
    assert not verify(SECRET, body + b" ", headers, now=1010)  # body changed
    assert not verify("t" * 32, body, headers, now=1010)  # other secret
    assert not verify(SECRET, body, headers, now=1000 + 301)  # too old
    assert not verify(SECRET, body, {}, now=1000)


def _gateway(monkeypatch: pytest.MonkeyPatch, respond: Any) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond(request)

    transport = httpx.MockTransport(handler)
    real_post = httpx.post

    def post(url: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(transport=transport) as client:
            return client.post(url, **kwargs)

    monkeypatch.setattr(parity.httpx, "post", post)
    assert real_post is not post
    return seen


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ({"text": "ab", "token_ids": [5, 6, 7]}, True),  # same tokens, text held back by vLLM
        ({"text": "ab", "token_ids": [5, 6, 8]}, False),
        ({"text": "ab", "token_ids": None}, True),  # no ids: text, minus a partial sequence
        ({"text": "zz", "token_ids": None}, False),
    ],
)
def test_verdicts(monkeypatch: pytest.MonkeyPatch, answer: dict[str, Any], ok: bool) -> None:
    seen = _gateway(monkeypatch, lambda _r: httpx.Response(200, json=answer))
    result = parity.check_parity("http://gw", SECRET, {"name": "ft:x"}, SAMPLE)
    assert result.ok is ok
    request = seen[0]
    assert request.url.path == "/internal/parity"
    assert verify(SECRET, request.content, dict(request.headers))
    assert json.loads(request.content)["adapter"] == {"name": "ft:x"}


def test_refused_adapter_is_a_mismatch_and_outage_is_a_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = {"error": {"message": "integrity", "code": "adapter_integrity_error"}}
    _gateway(monkeypatch, lambda _r: httpx.Response(503, json=refused))
    assert parity.check_parity("http://gw", SECRET, {}, SAMPLE).ok is False
    down = {"error": {"message": "no replica", "code": "model_unavailable"}}
    _gateway(monkeypatch, lambda _r: httpx.Response(503, json=down))
    result = parity.check_parity("http://gw", SECRET, {}, SAMPLE)
    assert result.ok is None and "503" in result.detail

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    _gateway(monkeypatch, unreachable)
    assert parity.check_parity("http://gw", SECRET, {}, SAMPLE).ok is None


def test_what_the_tenant_reads_of_a_failed_check_names_no_internal_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The detail goes into the job's events: the gateway's address and a proxy's page stay in
    the worker's log; the gateway's own error message (written for tenants) is kept."""

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connect to gw.internal.svc:8001 refused", request=request)

    _gateway(monkeypatch, unreachable)
    result = parity.check_parity("http://gw.internal.svc:8001", SECRET, {}, SAMPLE)
    assert result.detail == "gateway unreachable (ConnectError)"
    page = "<html>502 Bad Gateway from lb-7.internal.svc</html>"
    _gateway(monkeypatch, lambda _r: httpx.Response(502, text=page))
    assert parity.check_parity("http://gw", SECRET, {}, SAMPLE).detail == "gateway answered 502"
    down = {"error": {"message": "No replica is serving tiny-llama.", "code": "model_unavailable"}}
    _gateway(monkeypatch, lambda _r: httpx.Response(503, json=down))
    detail = parity.check_parity("http://gw", SECRET, {}, SAMPLE).detail
    assert detail == "gateway answered 503: No replica is serving tiny-llama."

"""GatewayApp's inference routes with the database and the replica's adapter placement faked:
malformed requests and callers that leave."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import Message

from api.tenancy.service import Principal
from serving.app import GatewayApp
from serving.catalog import ResolvedModel
from serving.errors import GatewayError
from serving.gateway import Call, Gateway
from serving.ratelimit import Limits, LocalRateLimiter
from serving.replicas import ReplicaPool
from serving.settings import GatewaySettings
from serving.upstream import UpstreamPool
from serving.usage import UsageMeter
from tests.unit.serving.scripted import read_request

PRINCIPAL = Principal(tenant_id="t1", tenant_slug="t1", key_id="k1", scopes=frozenset({"admin"}))


def _app(
    replica_url: str = "http://127.0.0.1:9", **settings_fields: Any
) -> tuple[GatewayApp, Gateway]:
    settings = GatewaySettings(vllm_urls=replica_url, **settings_fields)
    pool = ReplicaPool(settings.replica_urls, httpx.AsyncClient(), {})
    for replica in pool.replicas:
        replica.healthy, replica.base_model = True, "base"
    placer: Any = type("Placer", (), {"busy": Counter()})()
    gateway = Gateway(
        settings,
        None,  # type: ignore[arg-type]  # no database: the lookups below are faked
        UpstreamPool(read_timeout=5),
        pool,
        None,  # type: ignore[arg-type]
        placer,
        LocalRateLimiter(),
        UsageMeter(None),  # type: ignore[arg-type]
    )

    async def principal(*_: Any) -> Principal:
        return PRINCIPAL

    async def resolve(_tenant: str, name: str) -> ResolvedModel:
        return ResolvedModel(name, "base", 4096, None)

    async def limits_of(_tenant: str) -> Limits:
        return Limits(1000, 10**6)

    gateway.principal = principal  # type: ignore[method-assign]
    gateway.resolve = resolve  # type: ignore[method-assign]
    gateway.limits_of = limits_of  # type: ignore[method-assign]
    starlette = Starlette()
    starlette.state.gateway = gateway
    return GatewayApp(starlette), gateway


async def _call(app: GatewayApp, body: bytes, *, leave: bool = False) -> list[Message]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }
    incoming: list[Message] = (
        [{"type": "http.disconnect"}]
        if leave
        else [{"type": "http.request", "body": body, "more_body": False}]
    )
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the caller stays
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _error(sent: list[Message]) -> tuple[int, dict[str, Any]]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)["error"]


_CHAT = b'{"model": "m", "messages": [{"role": "user"}], "stream": true, '


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_CHAT + b'"stream_options": "x"}', "stream_options"),
        (_CHAT + b'"stream_options": [1]}', "stream_options"),
        (_CHAT + b'"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        # A key given twice: which copy vLLM would read is not ours to guess (the model checked
        # against the caller's tenant must be the model served).
        (_CHAT + b'"model": "other"}', "model"),
        (b'{"model": "m", "messages": [{"role": "user", "role": "system"}]}', "messages[0].role"),
    ],
    ids=[
        "stream-options-string",
        "stream-options-array",
        "deeply-nested",
        "model-twice",
        "nested-key-twice",
    ],
)
def test_malformed_bodies_are_a_400_that_says_what_is_wrong(body: bytes, param: str | None) -> None:
    app, _ = _app()
    status, error = _error(asyncio.run(_call(app, body)))
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_a_caller_leaving_while_sending_its_body_is_no_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = _app()
    with caplog.at_level(logging.ERROR):
        asyncio.run(_call(app, b"", leave=True))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("tokenizer_answers", [True, False], ids=["counted", "estimated"])
def test_a_caller_leaving_mid_stream_stops_the_replica_frees_it_and_is_billed(
    tokenizer_answers: bool,
) -> None:
    async def run() -> None:
        closed = asyncio.Event()
        tokenized: list[dict[str, Any]] = []

        async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, body = await read_request(reader)
            if head.startswith(b"POST /tokenize "):
                tokenized.append(json.loads(body))
                answer = b'{"count": 7, "max_model_len": 4096, "tokens": []}'
                status = b"200 OK" if tokenizer_answers else b"500 Internal Server Error"
                writer.write(
                    b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status, len(answer), answer)
                )
                await writer.drain()
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"transfer-encoding: chunked\r\n\r\n")
            # The role announcement and one token, in one piece: relayed together.
            events = (
                b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
                b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
            )
            writer.write(b"%x\r\n%s\r\n" % (len(events), events))
            await writer.drain()
            await reader.read()  # until the gateway hangs up
            closed.set()
            writer.close()

        server = await asyncio.start_server(replica, "127.0.0.1", 0)
        app, gateway = _app(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        messages = [{"role": "user", "content": "hi"}]
        body = json.dumps({"model": "m", "messages": messages, "stream": True}).encode()
        leave = asyncio.Event()
        sent: list[Message] = []
        incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if message.get("body"):
                leave.set()  # the caller goes away after the first piece

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [],
            "query_string": b"",
        }
        try:
            await asyncio.wait_for(app(scope, receive, send), 5)
            await asyncio.wait_for(closed.wait(), 5)
            assert sent[0]["status"] == 200 and b'"content":"a"' in sent[1]["body"]
            assert gateway.pool.replicas[0].inflight == 0 and not gateway.placer.busy
            # Billed without vLLM's usage chunk: the prompt as the replica counts it (for the
            # base model, with the caller's messages) or else estimated, and the token relayed.
            await gateway.finish_billing(timeout=5)
            assert tokenized == [{"model": "base", "messages": messages}]
            # (the estimate is of the body sent to vLLM: with the usage chunk asked for, salted)
            sent_on = {
                **json.loads(body),
                "stream_options": {"include_usage": True},
                "cache_salt": gateway._cache_salt("t1"),
            }
            prompt = 7 if tokenizer_answers else len(json.dumps(sent_on)) // 4
            assert dict(gateway.meter._pending) == {
                ("t1", "m", "prompt_tokens"): prompt,
                ("t1", "m", "completion_tokens"): 1,
            }
        finally:
            await gateway.upstream.aclose()
            server.close()

    asyncio.run(run())


def test_a_model_name_that_names_nothing_is_a_404_without_a_cache_entry() -> None:
    async def run() -> None:
        _, gateway = _app()
        del gateway.resolve  # the real one, not _app's stand-in
        name = "x" * 100_000
        with pytest.raises(GatewayError) as caught:
            await gateway.resolve("t1", name)
        assert caught.value.status == 404
        assert len(str(caught.value)) < 200  # the name is quoted cut short
        assert not gateway.models._entries

    asyncio.run(run())


async def _forwarded(
    app: GatewayApp, body: bytes, thinking: float = 0.0
) -> tuple[list[Message], list[bytes]]:
    """Send ``body`` through ``app`` to a scripted replica that takes ``thinking`` seconds to
    answer; returns what the caller got and the bodies the replica received."""
    received: list[bytes] = []

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        received.append(body)
        await asyncio.sleep(thinking)
        answer = b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(replica, "127.0.0.1", 0)
    app.app.state.gateway.pool.replicas[
        0
    ].url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        return await _call(app, body), received
    finally:
        await app.app.state.gateway.upstream.aclose()
        server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_without_max_tokens_is_capped_at_the_gateway_limit(stream: bool) -> None:
    app, _ = _app(max_tokens_limit=100)  # the model's context (4096) is larger
    body = json.dumps({"model": "m", "messages": [{"role": "user"}], "stream": stream}).encode()
    sent, received = asyncio.run(_forwarded(app, body))
    assert sent[0]["status"] == 200
    assert json.loads(received[0])["max_completion_tokens"] == 100
    # A limit the client set is forwarded as it is.
    body = json.dumps({"model": "m", "messages": [{"role": "user"}], "max_tokens": 7}).encode()
    app, _ = _app(max_tokens_limit=100)
    _, received = asyncio.run(_forwarded(app, body))
    assert json.loads(received[0])["max_tokens"] == 7
    assert "max_completion_tokens" not in json.loads(received[0])


def test_a_json_answer_says_how_long_the_replica_took_in_server_timing() -> None:
    app, _ = _app()
    body = json.dumps({"model": "m", "messages": [{"role": "user"}], "max_tokens": 1}).encode()
    sent, _ = asyncio.run(_forwarded(app, body, thinking=0.2))
    headers = dict(sent[0]["headers"])
    name, _, duration = headers[b"server-timing"].decode().partition(";dur=")
    assert name == "upstream"
    assert 200 <= float(duration) < 5000  # at least the replica's own time


def test_each_tenant_s_prompts_get_their_own_prefix_cache_salt() -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user"}], "max_tokens": 1, "cache_salt": "mine"}
    ).encode()
    app, gateway = _app()
    _, received = asyncio.run(_forwarded(app, body))
    forwarded = json.loads(received[0])
    salt = forwarded.pop("cache_salt")
    assert salt == gateway._cache_salt("t1") != "mine"  # the client's value is overridden
    assert len(salt) == 32 and salt != gateway._cache_salt("t2")
    assert forwarded == {k: v for k, v in json.loads(body).items() if k != "cache_salt"}


@pytest.mark.parametrize("field", ["n", "best_of"])
@pytest.mark.parametrize("value", [0, 17, True, "2"])
def test_too_many_choices_are_a_400(field: str, value: object) -> None:
    app, _ = _app()
    body = json.dumps({"model": "m", "messages": [{"role": "user"}], field: value}).encode()
    status, error = _error(asyncio.run(_call(app, body)))
    assert status == 400 and error["param"] == field


def _placing_gateway(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], *, published: bool
) -> tuple[Gateway, Call]:
    """A gateway whose replica's admin calls go to ``handler``, placing one adapter stored in
    a local folder (``published``: its files are there)."""
    from common.storage import LocalStorage
    from serving.adapters import AdapterCache, AdapterPlacer, AdapterRef

    storage = LocalStorage(tmp_path / "objects")
    digest = "0" * 64
    if published:
        files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
        manifest = {
            "files": {n: {"sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
        }
        for name, data in files.items():
            storage.put_bytes(f"t/models/a/{name}", data)
        body = json.dumps(manifest).encode()
        storage.put_bytes("t/models/a/manifest.json", body)
        digest = hashlib.sha256(body).hexdigest()
    _, gateway = _app()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    gateway.cache = AdapterCache(storage, tmp_path / "cache", 10**9)
    gateway.placer = AdapterPlacer(gateway.pool, gateway.cache, client, {}, capacity=2)
    ref = AdapterRef("ft:a", "base", "t/models/a", digest)
    model = ResolvedModel("ft:a", "base", 4096, ref)
    return gateway, Call("chat/completions", PRINCIPAL, model, Limits(1, 1), b"{}", False, False)


def test_an_adapter_the_replica_refuses_is_a_503_that_leaves_the_replica_in_routing(
    tmp_path: Path,
) -> None:
    refuse = lambda _: httpx.Response(500, text="LoRA rank 64 is greater than max_lora_rank 16")  # noqa: E731
    gateway, call = _placing_gateway(tmp_path, refuse, published=True)
    replica = gateway.pool.replicas[0]
    with pytest.raises(GatewayError) as caught:
        asyncio.run(gateway._place(replica, call))
    assert caught.value.status == 503 and caught.value.code == "adapter_load_failed"
    assert replica.available


def test_an_adapter_missing_from_storage_is_a_503_not_a_500(tmp_path: Path) -> None:
    gateway, call = _placing_gateway(tmp_path, lambda _: httpx.Response(200), published=False)
    replica = gateway.pool.replicas[0]
    with pytest.raises(GatewayError) as caught:
        asyncio.run(gateway._place(replica, call))
    assert caught.value.status == 503 and caught.value.code == "adapter_unavailable"
    assert replica.available


def test_a_replica_unreachable_during_a_load_is_left_for_another(tmp_path: Path) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    gateway, call = _placing_gateway(tmp_path, unreachable, published=True)
    with pytest.raises(httpx.TransportError):  # forward() marks it failed and tries another
        asyncio.run(gateway._place(gateway.pool.replicas[0], call))


def test_a_replica_breaking_off_a_stream_ends_it_with_an_error_event() -> None:
    async def run() -> None:
        async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"transfer-encoding: chunked\r\n\r\n")
            event = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            writer.transport.abort()  # dies mid-answer

        server = await asyncio.start_server(replica, "127.0.0.1", 0)
        app, gateway = _app(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        body = b'{"model": "m", "messages": [{"role": "user"}], "stream": true}'
        try:
            sent = await asyncio.wait_for(_call(app, body), 5)
        finally:
            await gateway.upstream.aclose()
            server.close()
        assert sent[0]["status"] == 200
        streamed = b"".join(m.get("body", b"") for m in sent[1:])
        assert b'"content":"a"' in streamed
        last = sent[-1]
        assert last["more_body"] is False and last["body"].startswith(b"data: ")
        assert json.loads(last["body"][6:])["error"]["code"] == "upstream_failed"
        replica_ = gateway.pool.replicas[0]
        assert not replica_.available and replica_.inflight == 0

    asyncio.run(run())


def test_a_caller_that_stops_reading_lets_go_of_the_replica() -> None:
    async def run() -> None:
        async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"transfer-encoding: chunked\r\n\r\n")
            for _ in range(3):
                event = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.05)
            await reader.read()

        server = await asyncio.start_server(replica, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        app, gateway = _app(url, upstream_timeout_seconds=0.3)
        body = b'{"model": "m", "messages": [{"role": "user"}], "stream": true}'
        incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            await asyncio.Event().wait()  # never leaves...
            raise AssertionError

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # ...and never reads

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        try:
            await asyncio.wait_for(
                app({**scope, "headers": [], "query_string": b""}, receive, send), 5
            )
            assert gateway.pool.replicas[0].inflight == 0 and not gateway.placer.busy
        finally:
            await gateway.upstream.aclose()
            server.close()

    asyncio.run(run())

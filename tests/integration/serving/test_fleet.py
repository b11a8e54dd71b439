"""Two vLLM replicas behind one gateway: adapter affinity, failover, a replica restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.conftest import TenantCreds
from tests.integration.serving.conftest import PublishedAdapter, RunningGateway, wait_healthy


def _holders(replicas: list[Any], name: str) -> list[Any]:
    holders = []
    for replica in replicas:
        try:
            served = httpx.get(f"{replica.url}/v1/models", timeout=5).json()["data"]
        except httpx.HTTPError:
            continue
        if name in {m["id"] for m in served}:
            holders.append(replica)
    return holders


def _ask(client: openai.OpenAI, name: str) -> str:
    response = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0
    )
    return response.choices[0].message.content or ""


def test_affinity_failover_and_restart(
    start_gateway: Callable[..., RunningGateway],
    vllm_factory: Callable[..., Any],
    new_tenant: Callable[..., TenantCreds],
    publish_random_adapter: Callable[..., PublishedAdapter],
    tiny_model_dir: Path,
) -> None:
    replicas = [
        vllm_factory(tiny_model_dir, "tiny-llama", max_loras=2, max_cpu_loras=2) for _ in range(2)
    ]
    gateway = start_gateway([r.url for r in replicas])
    wait_healthy(gateway, 2)
    tenant = new_tenant()
    names = [publish_random_adapter(seed=70 + i, tenant=tenant).name for i in range(2)]
    client = gateway.client(tenant.api_key)
    answers = {}
    for name in names:
        answers[name] = _ask(client, name)
        for _ in range(4):
            assert _ask(client, name) == answers[name]
        # Affinity: five requests, one replica holds the adapter.
        assert len(_holders(replicas, name)) == 1

    # The replica holding the first adapter dies: requests move to the other one.
    name = names[0]
    (home,) = _holders(replicas, name)
    home.kill()
    for _ in range(3):
        assert _ask(client, name) == answers[name]
    (survivor,) = _holders(replicas, name)
    assert survivor is not home

    # It comes back (empty, as a restarted vLLM is): served again without a gateway restart.
    home.start()
    home.wait_ready(180)
    wait_healthy(gateway, 2)
    for name in names:
        for _ in range(3):
            assert _ask(client, name) == answers[name]

"""The overview's vLLM replicas against a real gateway in front of the session's real vLLM
server, with an adapter loaded through the gateway the way a tenant's first request loads it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from common.internal_auth import REPLICAS_REQUEST, sign
from tests.conftest import RunningApi, TenantCreds, free_port, start_server
from tests.integration.admin.conftest import Seeder, login, shot
from tests.integration.conftest import TrainingStack
from tests.integration.serving.conftest import (
    RunningGateway,
    adapter_folder,
    gateway_settings,
    publish_adapter,
    wait_healthy,
)


@pytest.fixture
def admin_stack(api_server: RunningApi, tmp_path: Path) -> TrainingStack:
    """The admin tests' API, database, Redis database and bucket, in the shape the serving
    helpers take (no workers are started)."""
    settings: Any = api_server.settings
    bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
    return TrainingStack(
        api=api_server,
        env={
            "LORAPLEX_DATABASE_URL": settings.database_url,
            "LORAPLEX_STORAGE_URL": settings.storage_url,
        },
        bucket=bucket,
        s3_prefix=prefix,
        endpoint_url=settings.s3_endpoint_url,
        redis_url=settings.broker_url,
        tmp=tmp_path,
    )


@pytest.fixture
def real_gateway(
    admin_stack: TrainingStack, vllm_server: Any, tmp_path: Path
) -> Iterator[RunningGateway]:
    """A gateway (in this process) in front of the session's vLLM server."""
    from serving.app import create_gateway_app

    settings = gateway_settings(admin_stack, tmp_path / "gateway", [vllm_server.url])
    app = create_gateway_app(settings)
    port = free_port()
    server, thread = start_server(app, port)
    try:
        gateway = RunningGateway(f"http://127.0.0.1:{port}", app, settings)
        wait_healthy(gateway, 1)
        yield gateway
    finally:
        server.should_exit = True
        thread.join(10)


def test_overview_shows_the_replica_and_the_adapter_loaded_on_it(  # type: ignore[no-untyped-def]
    new_page,
    seed: Seeder,
    tenant: TenantCreds,
    admin_stack: TrainingStack,
    real_gateway: RunningGateway,
    vllm_server: Any,
    start_api,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    name = publish_adapter(admin_stack, tenant, adapter_folder(tiny_model_dir, tmp_path, seed=21))
    answer = real_gateway.client(tenant.api_key).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert answer.choices[0].message.content is not None
    # The public readiness probe gives counts only (in embedded mode it is on the public port);
    # the replica list, with every tenant's loaded adapters, answers only a signed request.
    readyz = httpx.get(f"{real_gateway.url}/readyz")
    assert readyz.json()["checks"]["replicas"] == "1 of 1 healthy"
    assert name not in readyz.text and vllm_server.url not in readyz.text
    unsigned = httpx.get(f"{real_gateway.url}/internal/replicas")
    assert unsigned.status_code == 404 and name not in unsigned.text
    forged = httpx.get(
        f"{real_gateway.url}/internal/replicas",
        headers=sign("another-secret-key-xxxxxxx", REPLICAS_REQUEST),
    )
    assert forged.status_code == 404
    # A signature of another request (a body, as a parity check signs) does not open it.
    other = httpx.get(
        f"{real_gateway.url}/internal/replicas", headers=sign(real_gateway.settings.secret_key, b"")
    )
    assert other.status_code == 404
    signed = httpx.get(
        f"{real_gateway.url}/internal/replicas",
        headers=sign(real_gateway.settings.secret_key, REPLICAS_REQUEST),
    )
    assert name in signed.json()["replicas"][vllm_server.url]["adapters"]

    # An API replica whose dashboard is told where the gateway is.
    api_url = start_api(LORAPLEX_GATEWAY_URL=real_gateway.url)
    page = new_page(api_url)
    login(page, seed.user("platform-admin"))
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("#gateway-status")).to_have_text("Gateway: ready")
    replica = page.locator(f"#replicas tr[data-replica='{vllm_server.url}']")
    expect(replica.locator(".replica-healthy")).to_have_text("yes")
    expect(replica).to_contain_text("tiny-llama")
    expect(replica.locator("code.adapter", has_text=name)).to_have_count(1)
    shot(page, "overview-replicas")

    page.click("nav >> text=Models")
    row = page.locator("#tuned-models tr", has_text=name)
    expect(row).to_contain_text(vllm_server.url)
    shot(page, "models-loaded-on")

    # The fleet is shared by every tenant: a tenant admin's overview does not show it.
    tenant_page = new_page(api_url)
    login(tenant_page, seed.user("tenant-admin", tenant.tenant_id))
    expect(tenant_page.locator("h1")).to_have_text("Overview")
    expect(tenant_page.locator("#replicas")).to_have_count(0)
    expect(tenant_page.locator("body")).not_to_contain_text(re.compile("vLLM replicas"))
    # Nor do its models: their adapter is loaded, but on which replica is the platform's.
    tenant_page.click("nav >> text=Models")
    tenant_row = tenant_page.locator("#tuned-models tr", has_text=name)
    expect(tenant_row.locator(".loaded-on")).to_have_text("loaded")
    expect(tenant_page.locator("body")).not_to_contain_text(vllm_server.url)

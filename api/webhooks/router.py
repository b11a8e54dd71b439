"""/v1/webhook_endpoints: manage endpoints, list and replay deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import FinetunePrincipal, ServicesDep, SessionDep
from api.errors import ERROR_RESPONSES
from api.webhooks import service
from api.webhooks.schemas import (
    CreateEndpointRequest,
    DeliveryList,
    DeliveryObject,
    EndpointDeleted,
    EndpointList,
    EndpointObject,
    RotateSecretRequest,
    UpdateEndpointRequest,
)

router = APIRouter(prefix="/v1/webhook_endpoints", tags=["webhooks"], responses=ERROR_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", response_model=EndpointObject)
def create_endpoint(
    body: CreateEndpointRequest,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
) -> EndpointObject:
    """Subscribe a URL to job events; the answer carries the signing secret, shown this once."""
    settings = services.settings
    return service.create(
        session, principal, body, settings.secret_key, settings.webhook_allowed_hosts
    )


@router.get("", response_model=EndpointList)
def list_endpoints(
    session: SessionDep,
    principal: FinetunePrincipal,
    after: str | None = None,
    limit: Limit = 20,
) -> EndpointList:
    rows, has_more = service.list_endpoints(session, principal, after, limit)
    return EndpointList(data=[service.to_object(r) for r in rows], has_more=has_more)


@router.get("/{endpoint_id}", response_model=EndpointObject)
def retrieve_endpoint(
    endpoint_id: str, session: SessionDep, principal: FinetunePrincipal
) -> EndpointObject:
    repo = service.EndpointRepository(session, principal.tenant_id)
    return service.to_object(repo.get_live(endpoint_id))


@router.post("/{endpoint_id}", response_model=EndpointObject)
def update_endpoint(
    endpoint_id: str,
    body: UpdateEndpointRequest,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
) -> EndpointObject:
    """Change the URL, events, description, or enable/disable."""
    return service.update(
        session, principal, endpoint_id, body, services.settings.webhook_allowed_hosts
    )


@router.delete("/{endpoint_id}", response_model=EndpointDeleted)
def delete_endpoint(
    endpoint_id: str, session: SessionDep, principal: FinetunePrincipal
) -> EndpointDeleted:
    return EndpointDeleted(id=service.delete(session, principal, endpoint_id), deleted=True)


@router.post("/{endpoint_id}/rotate_secret", response_model=EndpointObject)
def rotate_secret(
    endpoint_id: str,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    body: RotateSecretRequest | None = None,
) -> EndpointObject:
    """A new secret (shown once); the old one keeps signing for ``overlap_seconds``."""
    overlap = (body or RotateSecretRequest()).overlap_seconds
    return service.rotate_secret(
        session, principal, endpoint_id, overlap, services.settings.secret_key
    )


@router.post("/{endpoint_id}/enable", response_model=EndpointObject)
def enable_endpoint(
    endpoint_id: str, session: SessionDep, principal: FinetunePrincipal
) -> EndpointObject:
    row = service.EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    service.set_enabled(row, True)
    return service.to_object(row)


@router.post("/{endpoint_id}/disable", response_model=EndpointObject)
def disable_endpoint(
    endpoint_id: str, session: SessionDep, principal: FinetunePrincipal
) -> EndpointObject:
    row = service.EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    service.set_enabled(row, False)
    return service.to_object(row)


@router.post("/{endpoint_id}/test", response_model=DeliveryObject)
def send_test_event(
    endpoint_id: str, session: SessionDep, principal: FinetunePrincipal
) -> DeliveryObject:
    """Queue a ``webhook_endpoint.test`` event for this endpoint."""
    return service.send_test(session, principal, endpoint_id)


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    endpoint_id: str,
    session: SessionDep,
    principal: FinetunePrincipal,
    after: str | None = None,
    limit: Limit = 20,
) -> DeliveryList:
    """Deliveries to this endpoint, newest first, each with its attempts."""
    data, has_more = service.list_deliveries(session, principal, endpoint_id, after, limit)
    return DeliveryList(data=data, has_more=has_more)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/replay", response_model=DeliveryObject)
def replay_delivery(
    endpoint_id: str, delivery_id: str, session: SessionDep, principal: FinetunePrincipal
) -> DeliveryObject:
    """Send a delivery again, whatever its state."""
    return service.replay(session, principal, endpoint_id, delivery_id)

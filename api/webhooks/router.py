"""/v1/webhook_endpoints: manage endpoints, list and replay deliveries."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.deps import FinetunePrincipal, ServicesDep, SessionDep
from api.errors import ERROR_RESPONSES
from api.idempotency import fingerprint, run_idempotent
from api.json_body import StrictJSONRoute
from api.services import Services
from api.tenancy.service import Principal
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
from common.webhooks import signing

PREFIX = "/v1/webhook_endpoints"
router = APIRouter(
    prefix=PREFIX, tags=["webhooks"], responses=ERROR_RESPONSES, route_class=StrictJSONRoute
)

Limit = Annotated[int, Query(ge=1, le=100)]
IdempotencyKey = Annotated[str | None, Header()]

# The answers of create and rotate_secret carry the signing secret in clear. The Idempotency-Key
# row that replays such an answer keeps the secret encrypted, as the endpoint row does: a
# database dump must not let anyone sign our webhooks (ADR 0009).
_SEALED = "sealed_secret"


def _once(
    session: Session,
    services: Services,
    principal: Principal,
    idempotency_key: str | None,
    path: str,
    body: BaseModel | None,
    produce: Callable[[], BaseModel],
) -> JSONResponse:
    """Run a POST once per Idempotency-Key (as job create does); a retry gets its answer."""
    if idempotency_key is None:
        return JSONResponse(produce().model_dump(mode="json"))
    server_secret = services.settings.secret_key

    def stored() -> tuple[int, dict[str, Any]]:
        answer = produce().model_dump(mode="json")
        if answer.get("secret") is not None:
            answer[_SEALED] = signing.encrypt_secret(server_secret, answer["secret"])
            answer["secret"] = None
        return 200, answer

    payload = None if body is None else body.model_dump(mode="json")
    response = run_idempotent(
        session, principal.tenant_id, idempotency_key, fingerprint("POST", path, payload), stored
    )
    answer = json.loads(bytes(response.body))
    sealed = answer.pop(_SEALED, None)
    if sealed is None:
        return response
    answer["secret"] = signing.decrypt_secret(server_secret, sealed)
    replayed = {k: v for k, v in response.headers.items() if k == "idempotent-replayed"}
    return JSONResponse(answer, status_code=response.status_code, headers=replayed)


@router.post("", response_model=EndpointObject)
def create_endpoint(
    body: CreateEndpointRequest,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Subscribe a URL to job events; the answer carries the signing secret, shown this once."""
    settings = services.settings
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        PREFIX,
        body,
        lambda: service.create(
            session, principal, body, settings.secret_key, settings.webhook_allowed_hosts
        ),
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
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Change the URL, events, description, or enable/disable."""
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        f"{PREFIX}/{endpoint_id}",
        body,
        lambda: service.update(
            session, principal, endpoint_id, body, services.settings.webhook_allowed_hosts
        ),
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
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """A new secret (shown once); the old one keeps signing for ``overlap_seconds``."""
    # No body is the default body: both are the same request for the Idempotency-Key.
    request = body or RotateSecretRequest()
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        f"{PREFIX}/{endpoint_id}/rotate_secret",
        request,
        lambda: service.rotate_secret(
            session, principal, endpoint_id, request.overlap_seconds, services.settings.secret_key
        ),
    )


def _set_enabled(
    session: Session, principal: Principal, endpoint_id: str, enabled: bool
) -> EndpointObject:
    row = service.EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    service.set_enabled(session, row, enabled)
    return service.to_object(row)


@router.post("/{endpoint_id}/enable", response_model=EndpointObject)
def enable_endpoint(
    endpoint_id: str,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        f"{PREFIX}/{endpoint_id}/enable",
        None,
        lambda: _set_enabled(session, principal, endpoint_id, True),
    )


@router.post("/{endpoint_id}/disable", response_model=EndpointObject)
def disable_endpoint(
    endpoint_id: str,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        f"{PREFIX}/{endpoint_id}/disable",
        None,
        lambda: _set_enabled(session, principal, endpoint_id, False),
    )


@router.post("/{endpoint_id}/test", response_model=DeliveryObject)
def send_test_event(
    endpoint_id: str,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Queue a ``webhook_endpoint.test`` event for this endpoint."""
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        f"{PREFIX}/{endpoint_id}/test",
        None,
        lambda: service.send_test(session, principal, endpoint_id),
    )


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
    endpoint_id: str,
    delivery_id: str,
    session: SessionDep,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Send a delivery again, whatever its state."""
    return _once(
        session,
        services,
        principal,
        idempotency_key,
        f"{PREFIX}/{endpoint_id}/deliveries/{delivery_id}/replay",
        None,
        lambda: service.replay(session, principal, endpoint_id, delivery_id),
    )

"""Webhook endpoints: create (secret shown once), update, rotate, enable/disable, test, replay."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import BadRequest, NotFound
from api.pagination import page
from api.scoping import TenantScopedRepository
from api.tenancy.service import Principal
from api.webhooks.schemas import (
    AttemptObject,
    CreateEndpointRequest,
    DeliveryObject,
    EndpointObject,
    UpdateEndpointRequest,
)
from common import ids
from common.webhooks import signing
from common.webhooks.events import (
    DISABLED_BY_TENANT,
    PARKED_AT_MS,
    due_time_ms,
    endpoint_test_event,
    enqueue_delivery,
    set_parked,
    wake_delivery,
)
from common.webhooks.ssrf import UnsafeURL, check_url
from models_db.base import now_ts
from models_db.models import (
    AuditLogEntry,
    Tenant,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)

MAX_ENDPOINTS_PER_TENANT = 20


class EndpointRepository(TenantScopedRepository[WebhookEndpoint]):
    model = WebhookEndpoint

    def get_live(self, endpoint_id: str) -> WebhookEndpoint:
        row = self.get(endpoint_id)
        if row is None or row.deleted_at is not None:
            raise NotFound(
                f"No webhook endpoint found with id '{ids.show_id(endpoint_id)}'.", param="id"
            )
        return row


class DeliveryRepository(TenantScopedRepository[WebhookDelivery]):
    model = WebhookDelivery


def _checked_url(url: str, allow_hosts: frozenset[str]) -> str:
    try:
        return check_url(url, allow_hosts=allow_hosts).url
    except UnsafeURL as exc:
        raise BadRequest(f"Invalid webhook URL: {exc}", param="url", code="invalid_url") from None


def to_object(row: WebhookEndpoint, secret: str | None = None) -> EndpointObject:
    return EndpointObject(
        id=row.id,
        url=row.url,
        events=list(row.events),
        description=row.description,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        created_at=row.created_at,
        secret=secret,
        previous_secret_expires_at=row.previous_secret_expires_at,
    )


def _audit(session: Session, principal: Principal, action: str, target: str) -> None:
    session.add(
        AuditLogEntry(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action=action,
            target_type="webhook_endpoint",
            target_id=target,
            data=None,
        )
    )


def create(
    session: Session,
    principal: Principal,
    body: CreateEndpointRequest,
    server_secret: str,
    allow_hosts: frozenset[str],
) -> EndpointObject:
    repo = EndpointRepository(session, principal.tenant_id)
    url = _checked_url(body.url, allow_hosts)  # name lookups before any lock is taken
    # Creates of one tenant take turns from here on, so two at once cannot both pass the count.
    # (FOR NO KEY UPDATE: rows that merely reference the tenant are not held up.)
    session.get(Tenant, principal.tenant_id, with_for_update={"key_share": True})
    live = session.scalars(repo.select().where(WebhookEndpoint.deleted_at.is_(None))).all()
    if len(live) >= MAX_ENDPOINTS_PER_TENANT:
        raise BadRequest(
            f"An organization can have at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints.",
            code="too_many_endpoints",
        )
    secret = signing.generate_secret()
    row = repo.add(
        WebhookEndpoint(
            id=ids.new_id(ids.WEBHOOK_ENDPOINT),
            tenant_id=principal.tenant_id,
            url=url,
            description=body.description,
            events=sorted(set(body.events)),
            secret_encrypted=signing.encrypt_secret(server_secret, secret),
            enabled=True,
        )
    )
    _audit(session, principal, "webhook_endpoint.create", row.id)
    session.flush()
    return to_object(row, secret)


def list_endpoints(
    session: Session, principal: Principal, after: str | None, limit: int
) -> tuple[Sequence[WebhookEndpoint], bool]:
    repo = EndpointRepository(session, principal.tenant_id)
    stmt = repo.select().where(WebhookEndpoint.deleted_at.is_(None))
    return page(session, stmt, WebhookEndpoint.id, after, limit, prefix=ids.WEBHOOK_ENDPOINT)


def update(
    session: Session,
    principal: Principal,
    endpoint_id: str,
    body: UpdateEndpointRequest,
    allow_hosts: frozenset[str],
) -> EndpointObject:
    row = EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    if body.url is not None:
        row.url = _checked_url(body.url, allow_hosts)
    if body.events is not None:
        row.events = sorted(set(body.events))
    if body.description is not None:
        row.description = body.description
    if body.enabled is not None:
        set_enabled(session, row, body.enabled)
    _audit(session, principal, "webhook_endpoint.update", row.id)
    session.flush()
    return to_object(row)


def set_enabled(session: Session, row: WebhookEndpoint, enabled: bool) -> None:
    if enabled and not row.enabled:
        row.enabled, row.disabled_reason, row.disabled_at, row.failing_since = (
            True,
            None,
            None,
            None,
        )
        set_parked(session, row.id, False)  # what waited is due now
    elif not enabled and row.enabled:
        row.enabled, row.disabled_reason, row.disabled_at = (
            False,
            DISABLED_BY_TENANT,
            now_ts(),
        )
        set_parked(session, row.id, True)
    elif not enabled:
        # Disabled by us (410, failing): the tenant now turns it off too, so new events stop
        # being kept for it.
        row.disabled_reason = DISABLED_BY_TENANT


def delete(session: Session, principal: Principal, endpoint_id: str) -> str:
    row = EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    row.deleted_at = now_ts()
    row.enabled = False
    _audit(session, principal, "webhook_endpoint.delete", row.id)
    return row.id


def rotate_secret(
    session: Session,
    principal: Principal,
    endpoint_id: str,
    overlap_seconds: int,
    server_secret: str,
) -> EndpointObject:
    row = EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    secret = signing.generate_secret()
    row.previous_secret_encrypted = row.secret_encrypted if overlap_seconds else None
    row.previous_secret_expires_at = now_ts() + overlap_seconds if overlap_seconds else None
    row.secret_encrypted = signing.encrypt_secret(server_secret, secret)
    _audit(session, principal, "webhook_endpoint.rotate_secret", row.id)
    session.flush()
    return to_object(row, secret)


def send_test(session: Session, principal: Principal, endpoint_id: str) -> DeliveryObject:
    row = EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    if not row.enabled:
        raise BadRequest("The endpoint is disabled; enable it first.", code="endpoint_disabled")
    event_id, body = endpoint_test_event(row)
    delivery = enqueue_delivery(session, row, event_id, "webhook_endpoint.test", body)
    session.flush()
    return delivery_object(delivery, [])


def delivery_object(row: WebhookDelivery, attempts: Sequence[WebhookAttempt]) -> DeliveryObject:
    return DeliveryObject(
        id=row.id,
        endpoint_id=row.endpoint_id,
        event_id=row.event_id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        # None while parked: it waits for its endpoint to be enabled, not for a time.
        next_attempt_at=row.next_attempt_at_ms // 1000
        if row.status == "pending" and row.next_attempt_at_ms < PARKED_AT_MS
        else None,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        delivered_at=row.delivered_at,
        created_at=row.created_at,
        attempt_log=[
            AttemptObject(
                attempt=a.attempt,
                created_at=a.created_at,
                status_code=a.status_code,
                duration_ms=a.duration_ms,
                response_excerpt=a.response_excerpt,
                error=a.error,
            )
            for a in attempts
        ],
    )


def list_deliveries(
    session: Session, principal: Principal, endpoint_id: str, after: str | None, limit: int
) -> tuple[list[DeliveryObject], bool]:
    EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    repo = DeliveryRepository(session, principal.tenant_id)
    rows, has_more = page(
        session,
        repo.select().where(WebhookDelivery.endpoint_id == endpoint_id),
        WebhookDelivery.id,
        after,
        limit,
        prefix=ids.WEBHOOK_DELIVERY,
    )
    attempts: dict[str, list[WebhookAttempt]] = {r.id: [] for r in rows}
    if rows:
        for attempt in session.scalars(
            select(WebhookAttempt)
            .where(
                WebhookAttempt.tenant_id == principal.tenant_id,
                WebhookAttempt.delivery_id.in_(list(attempts)),
            )
            .order_by(WebhookAttempt.id)
        ):
            attempts[attempt.delivery_id].append(attempt)
    return [delivery_object(r, attempts[r.id]) for r in rows], has_more


def replay(
    session: Session, principal: Principal, endpoint_id: str, delivery_id: str
) -> DeliveryObject:
    """Send a delivery again (same event id, so a receiver that already has it can ignore it)."""
    endpoint = EndpointRepository(session, principal.tenant_id).get_live(endpoint_id)
    row = DeliveryRepository(session, principal.tenant_id).get(delivery_id)
    if row is None or row.endpoint_id != endpoint.id:
        raise NotFound(
            f"No delivery found with id '{ids.show_id(delivery_id)}'.", param="delivery_id"
        )
    row.status = "pending"
    row.next_attempt_at_ms = due_time_ms(endpoint)
    row.delivered_at = None
    wake_delivery(session, row)
    _audit(session, principal, "webhook_delivery.replay", row.id)
    session.flush()
    return delivery_object(row, [])

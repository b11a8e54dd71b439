"""Webhook events, written in the same transaction as the change they announce.

One delivery row per subscribed, enabled endpoint of the tenant, plus an outbox message that
wakes a worker to send it now; the worker's poller sends whatever the message missed (DESIGN
§5: the outbox is what makes the event survive a crash between commit and publish).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common import ids
from models_db.base import now_ms, now_ts
from models_db.models import FineTuningJob, OutboxMessage, WebhookDelivery, WebhookEndpoint

DELIVER_WEBHOOK_TASK = "loraplex.webhooks.deliver"
# The reason an endpoint disabled through the API carries: such an endpoint gets no events.
DISABLED_BY_TENANT = "Disabled by the tenant."
# The due time of a pending delivery whose endpoint is disabled: beyond any real time, so the
# senders' search for due deliveries (an index range up to now) never walks over them however
# many pile up; enabling the endpoint makes them due at once (set_parked).
PARKED_AT_MS = 2**62


def due_time_ms(endpoint: WebhookEndpoint) -> int:
    """When a delivery to ``endpoint`` queued (or replayed) now becomes due."""
    return now_ms() if endpoint.enabled else PARKED_AT_MS


def set_parked(session: Session, endpoint_id: str, parked: bool) -> None:
    """Park the endpoint's pending deliveries (it was disabled), or make the parked ones due
    now (it was enabled)."""
    is_parked = WebhookDelivery.next_attempt_at_ms >= PARKED_AT_MS
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint_id,
            WebhookDelivery.status == "pending",
            ~is_parked if parked else is_parked,
        )
        .values(next_attempt_at_ms=PARKED_AT_MS if parked else now_ms())
    )


JOB_EVENT_TYPES = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}
TEST_EVENT_TYPE = "webhook_endpoint.test"
EVENT_TYPES = (*JOB_EVENT_TYPES.values(), TEST_EVENT_TYPE)


def job_summary(job: FineTuningJob) -> dict[str, Any]:
    """The job as the API shows it, for the event's ``data``."""
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "status": job.status,
        "model": job.base_model_id,
        "fine_tuned_model": job.fine_tuned_model,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "training_file": job.training_file_id,
        "validation_file": job.validation_file_id,
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "seed": job.seed,
        "suffix": job.suffix,
        "metadata": job.job_metadata,
    }


def _event_body(event_id: str, event_type: str, data: dict[str, Any]) -> str:
    # OpenAI's thin payload (id, object, created_at, type, data.id); data carries the job too.
    payload = {
        "id": event_id,
        "object": "event",
        "created_at": now_ts(),
        "type": event_type,
        "data": data,
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def enqueue_delivery(
    session: Session, endpoint: WebhookEndpoint, event_id: str, event_type: str, body: str
) -> WebhookDelivery:
    delivery = WebhookDelivery(
        id=ids.new_id(ids.WEBHOOK_DELIVERY),
        tenant_id=endpoint.tenant_id,
        endpoint_id=endpoint.id,
        event_id=event_id,
        event_type=event_type,
        body=body,
        status="pending",
        attempts=0,
        next_attempt_at_ms=due_time_ms(endpoint),
    )
    session.add(delivery)
    wake_delivery(session, delivery)
    return delivery


def wake_delivery(session: Session, delivery: WebhookDelivery) -> None:
    session.add(
        OutboxMessage(
            task=DELIVER_WEBHOOK_TASK,
            queue="default",
            args=[delivery.id],
            tenant_id=delivery.tenant_id,
        )
    )


def emit_event(session: Session, tenant_id: str, event_type: str, data: dict[str, Any]) -> int:
    """Queue ``event_type`` for every endpoint of the tenant that subscribed to it, except one
    the tenant disabled itself. An endpoint that we disabled (410 Gone, failing for days) gets
    its deliveries too: they wait, unsent, until the tenant enables it again, so no event is
    lost while a receiver is being fixed."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == tenant_id,
            WebhookEndpoint.enabled.is_(True)
            | (WebhookEndpoint.disabled_reason.is_distinct_from(DISABLED_BY_TENANT)),
            WebhookEndpoint.deleted_at.is_(None),
        )
    ).all()
    subscribed = [e for e in endpoints if event_type in (e.events or [])]
    if not subscribed:
        return 0
    event_id = ids.new_id(ids.WEBHOOK_EVENT)
    body = _event_body(event_id, event_type, data)
    for endpoint in subscribed:
        enqueue_delivery(session, endpoint, event_id, event_type, body)
    return len(subscribed)


def emit_job_finished(session: Session, job_id: str) -> int:
    """After a job reached succeeded, failed or cancelled in this transaction."""
    session.flush()
    job = session.get(FineTuningJob, job_id, populate_existing=True)
    if job is None or job.status not in JOB_EVENT_TYPES:
        return 0
    return emit_event(session, job.tenant_id, JOB_EVENT_TYPES[job.status], job_summary(job))


def endpoint_test_event(endpoint: WebhookEndpoint) -> tuple[str, str]:
    event_id = ids.new_id(ids.WEBHOOK_EVENT)
    return event_id, _event_body(
        event_id, TEST_EVENT_TYPE, {"id": endpoint.id, "object": "webhook_endpoint"}
    )

"""Webhook endpoints of tenants, the deliveries of events to them, and every attempt."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, BigIntPK, TenantOwned


class WebhookEndpoint(Base, TenantOwned):
    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(500), default="")
    # Event types delivered here.
    events: Mapped[list[Any]]
    # Signing secrets, encrypted with a key derived from the server secret. During a rotation's
    # overlap the previous secret signs too, until previous_secret_expires_at.
    secret_encrypted: Mapped[str] = mapped_column(String(200))
    previous_secret_encrypted: Mapped[str | None] = mapped_column(String(200))
    previous_secret_expires_at: Mapped[int | None]
    enabled: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    disabled_at: Mapped[int | None]
    # When the current run of failed attempts began (None while deliveries succeed).
    failing_since: Mapped[int | None]
    deleted_at: Mapped[int | None]


class WebhookDelivery(Base, TenantOwned):
    """One event for one endpoint: pending until delivered, failed for good, or replayed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at_ms"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"))
    # The event id: the `webhook-id` header, the same on every attempt.
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(100))
    # The exact bytes sent (JSON), fixed at creation so every attempt signs the same body.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending|succeeded|failed
    attempts: Mapped[int] = mapped_column(default=0)
    # Due time of the next attempt; while an attempt runs, the end of its lease.
    next_attempt_at_ms: Mapped[int] = mapped_column(BigInteger)
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(500))
    delivered_at: Mapped[int | None]


class WebhookAttempt(Base, TenantOwned):
    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"))
    attempt: Mapped[int]
    status_code: Mapped[int | None]
    duration_ms: Mapped[float]
    response_excerpt: Mapped[str] = mapped_column(String(1000), default="")
    error: Mapped[str | None] = mapped_column(String(500))

"""Cross-cutting records: the outbox, usage, the audit log and idempotency keys."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, BigIntPK, Timestamped


class OutboxMessage(Base, Timestamped):
    """Work for the broker, written in the same transaction as the change that caused it."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unpublished", "published_at", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(50))
    args: Mapped[list[Any]]
    tenant_id: Mapped[str | None] = mapped_column(String(40))
    published_at: Mapped[int | None]
    publish_attempts: Mapped[int] = mapped_column(default=0)


class UsageRecord(Base, Timestamped):
    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(40))  # trained_tokens | prompt_tokens | ...
    quantity: Mapped[int]
    model: Mapped[str | None] = mapped_column(String(400))
    job_id: Mapped[str | None] = mapped_column(String(40))


class AuditLogEntry(Base, Timestamped):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))  # "key:<id>", "user:<id>", "cli"
    action: Mapped[str] = mapped_column(String(100))
    target_type: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str] = mapped_column(String(400))
    data: Mapped[dict[str, Any] | None]


class IdempotencyKey(Base, Timestamped):
    """The first response to a POST carrying an ``Idempotency-Key``, replayed on retries."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of method, path and body: a key reused for another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]]

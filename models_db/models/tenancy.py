"""Tenants (organisations), their users and their API keys."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, TenantOwned, Timestamped


class Tenant(Base, Timestamped):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(40), unique=True)
    # Quotas; None means the platform default applies.
    max_concurrent_jobs: Mapped[int] = mapped_column(default=2)
    max_stored_bytes: Mapped[int] = mapped_column(default=10 * 1024**3)
    max_requests_per_minute: Mapped[int] = mapped_column(default=600)
    max_tokens_per_minute: Mapped[int] = mapped_column(default=200_000)
    disabled_at: Mapped[int | None]


class User(Base, Timestamped):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Platform admins belong to no tenant.
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))  # platform-admin | tenant-admin | member
    disabled_at: Mapped[int | None]
    last_login_at: Mapped[int | None]


class ApiKey(Base, TenantOwned):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # Only a keyed hash of the secret is stored; the secret is shown once at creation.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # First characters of the key, shown in listings so a person can tell keys apart.
    display_prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[list[Any]]
    created_by: Mapped[str | None] = mapped_column(String(40))
    last_used_at: Mapped[int | None]
    # Indexed: every gateway asks twice a second which keys were revoked lately.
    revoked_at: Mapped[int | None] = mapped_column(index=True)

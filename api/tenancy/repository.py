"""Queries for tenants and API keys."""

from __future__ import annotations

from sqlalchemy import Connection, or_, select, update
from sqlalchemy.orm import Session

from models_db.models import ApiKey, Tenant


class TenantRepository:
    """Tenants are the scope itself, so this repository is platform-level."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, tenant_id: str) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def get_by_slug_or_id(self, ref: str) -> Tenant | None:
        return self.session.scalars(
            select(Tenant).where((Tenant.slug == ref) | (Tenant.id == ref))
        ).first()

    def slug_taken(self, slug: str) -> bool:
        return (
            self.session.scalars(select(Tenant.id).where(Tenant.slug == slug)).first() is not None
        )

    def add(self, tenant: Tenant) -> Tenant:
        self.session.add(tenant)
        return tenant


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def find_active_by_hash(self, key_hash: str) -> tuple[ApiKey, Tenant] | None:
        row = self.session.execute(
            select(ApiKey, Tenant)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(
                ApiKey.key_hash == key_hash,
                ApiKey.revoked_at.is_(None),
                Tenant.disabled_at.is_(None),
            )
        ).first()
        return (row[0], row[1]) if row else None

    @staticmethod
    def touch(conn: Connection, key_id: str, now: int, interval: int) -> None:
        """Record use, unless another request already did within ``interval`` seconds."""
        conn.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key_id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - interval),
            )
            .values(last_used_at=now)
        )

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        return key

    def revoke(self, tenant_id: str, key_id: str, now: int) -> bool:
        result = self.session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

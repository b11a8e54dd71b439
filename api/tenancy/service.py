"""Tenants and API keys: creation, authentication, revocation."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from api.tenancy import keys
from api.tenancy.cache import TtlCache
from api.tenancy.repository import ApiKeyRepository, TenantRepository
from common import ids
from models_db.base import now_ts
from models_db.models import ApiKey, AuditLogEntry, Tenant

_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$")
# last_used_at is refreshed at most this often, so authentication is not a write per request.
_TOUCH_INTERVAL_SECONDS = 60


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the key, with the key's scopes."""

    tenant_id: str
    tenant_slug: str
    key_id: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}"


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once, never stored


class TenancyError(ValueError):
    pass


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug if len(slug) >= 3 else (slug + "-org")[:40]


def create_tenant(
    session: Session, name: str, slug: str | None = None, *, actor: str = "cli"
) -> Tenant:
    """Create a tenant; ``actor`` is who the audit log names (the CLI, or a dashboard user)."""
    name = name.strip()
    if not name or len(name) > 200:
        raise TenancyError("tenant name must be 1-200 characters")
    given = slug
    slug = slug or slugify(name)
    if not _SLUG_RE.match(slug):
        if given is None:  # made from the name: say so, the user never typed it
            raise TenancyError(
                f"cannot make a slug from the name {name!r}; give one (3-40 lowercase "
                "letters, digits and dashes)"
            )
        raise TenancyError(f"invalid slug {slug!r}: use 3-40 lowercase letters, digits and dashes")
    repo = TenantRepository(session)
    if repo.slug_taken(slug):
        raise TenancyError(f"slug {slug!r} is already taken")
    tenant = repo.add(Tenant(id=ids.new_id(ids.TENANT), name=name, slug=slug))
    session.add(
        AuditLogEntry(
            tenant_id=tenant.id,
            actor=actor,
            action="tenant.create",
            target_type="tenant",
            target_id=tenant.id,
            data={"slug": slug},
        )
    )
    session.flush()
    return tenant


def create_api_key(
    session: Session,
    secret_key: str,
    tenant: Tenant,
    *,
    name: str = "",
    scopes: tuple[str, ...] = keys.SCOPES,
    actor: str = "cli",
) -> CreatedKey:
    unknown = set(scopes) - set(keys.SCOPES)
    if unknown or not scopes:
        raise TenancyError(f"scopes must be a non-empty subset of {', '.join(keys.SCOPES)}")
    secret = keys.generate_key()
    key = ApiKeyRepository(session).add(
        ApiKey(
            id=ids.new_id(ids.API_KEY),
            tenant_id=tenant.id,
            name=name,
            key_hash=keys.hash_key(secret_key, secret),
            display_prefix=secret[:8],
            scopes=sorted(set(scopes)),
            created_by=actor,
        )
    )
    session.add(
        AuditLogEntry(
            tenant_id=tenant.id,
            actor=actor,
            action="api_key.create",
            target_type="api_key",
            target_id=key.id,
            data={"scopes": key.scopes},
        )
    )
    session.flush()
    return CreatedKey(key=key, secret=secret)


def revoke_api_key(session: Session, tenant_id: str, key_id: str, actor: str) -> bool:
    revoked = ApiKeyRepository(session).revoke(tenant_id, key_id, now_ts())
    if revoked:
        session.add(
            AuditLogEntry(
                tenant_id=tenant_id,
                actor=actor,
                action="api_key.revoke",
                target_type="api_key",
                target_id=key_id,
                data=None,
            )
        )
    return revoked


def authenticate(
    session: Session,
    secret_key: str,
    presented: str,
    cache: TtlCache[Principal] | None = None,
) -> Principal | None:
    """Resolve a presented key to a principal; None for unknown, revoked or malformed keys."""
    if not keys.looks_like_key(presented):
        return None
    key_hash = keys.hash_key(secret_key, presented)
    if cache is not None and (remembered := cache.get(key_hash)) is not None:
        return remembered
    found = ApiKeyRepository(session).find_active_by_hash(key_hash)
    if found is None:
        return None
    key, tenant = found
    principal = Principal(
        tenant_id=tenant.id, tenant_slug=tenant.slug, key_id=key.id, scopes=frozenset(key.scopes)
    )
    if cache is not None:
        cache.put(key_hash, principal)
    now = now_ts()
    if key.last_used_at is None or now - key.last_used_at >= _TOUCH_INTERVAL_SECONDS:
        # Its own short transaction: holding the key's row lock until the request commits
        # would serialize every concurrent request made with this key.
        engine = session.get_bind()
        assert isinstance(engine, Engine)
        with engine.connect() as conn:
            ApiKeyRepository.touch(conn, key.id, now, _TOUCH_INTERVAL_SECONDS)
            conn.commit()
    return principal

"""What only the dashboard does: users and their logins, tenant quotas and disabling.

Everything else the dashboard changes (jobs, keys, webhooks, models) goes through the API's own
services with an :class:`AdminPrincipal`, so the rules and the audit rows are the API's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.admin import sessions
from api.admin.repository import AdminRepository
from api.errors import BadRequest, NotFound
from api.tenancy.service import Principal, create_tenant
from common import ids
from models_db.base import now_ts
from models_db.models import AuditLogEntry, Tenant, User

ROLES = ("platform-admin", "tenant-admin", "member")
_EMAIL_RE = re.compile(r"^[^@\s]{1,200}@[^@\s]{1,100}\.[^@\s]{1,60}$")
MIN_PASSWORD_LENGTH = 10
# Quota fields a platform admin may edit, with their bounds.
QUOTAS: dict[str, tuple[int, int]] = {
    "max_concurrent_jobs": (0, 1000),
    "max_stored_bytes": (0, 10 * 1024**5),
    "max_requests_per_minute": (0, 10_000_000),
    "max_tokens_per_minute": (0, 10**12),
}


@dataclass(frozen=True)
class AdminPrincipal(Principal):
    """A dashboard user acting inside one tenant: the API's services see a principal of that
    tenant, and the audit log sees the user."""

    user_id: str = ""

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"


class UserError(ValueError):
    pass


def audit(
    session: Session,
    actor: str,
    tenant_id: str | None,
    action: str,
    target: tuple[str, str],
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditLogEntry(
            tenant_id=tenant_id,
            actor=actor,
            action=action,
            target_type=target[0],
            target_id=target[1],
            data=data,
        )
    )


def create_user(
    session: Session,
    email: str,
    password: str,
    role: str,
    tenant_id: str | None,
    actor: str = "cli",
) -> User:
    """Create a dashboard user; platform admins belong to no tenant, the others to one."""
    email = email.strip().lower()
    if not _EMAIL_RE.match(email):
        raise UserError(f"invalid email address {email!r}")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")
    if role == "platform-admin":
        tenant_id = None
    elif tenant_id is None:
        raise UserError(f"a {role} belongs to a tenant: give one")
    repo = AdminRepository(session, None)
    if repo.user_by_email(email) is not None:
        raise UserError(f"a user with the email {email} already exists")
    user = User(
        id=ids.new_id(ids.USER),
        tenant_id=tenant_id,
        email=email,
        password_hash=sessions.hash_password(password),
        role=role,
    )
    session.add(user)
    audit(session, actor, tenant_id, "user.create", ("user", user.id), {"role": role})
    session.flush()
    return user


def check_login(session: Session, email: str, password: str) -> User | None:
    """The user whose email and password these are, if it may log in; records the login."""
    user = AdminRepository(session, None).user_by_email(email.strip().lower())
    if not sessions.verify_password(user.password_hash if user else None, password):
        return None
    assert user is not None
    if user.disabled_at is not None:
        return None
    if user.tenant_id is not None:
        tenant = AdminRepository(session, None).tenant(user.tenant_id)
        if tenant is None or tenant.disabled_at is not None:
            return None
    if sessions.needs_rehash(user.password_hash):
        user.password_hash = sessions.hash_password(password)
    user.last_login_at = now_ts()
    audit(session, f"user:{user.id}", user.tenant_id, "user.login", ("user", user.id))
    session.flush()
    return user


def create_tenant_as(session: Session, actor: str, name: str, slug: str | None) -> Tenant:
    """The tenancy service's create, with the audit row naming the dashboard user."""
    tenant = create_tenant(session, name, slug or None)
    # create_tenant records the actor "cli" (it has no actor parameter yet): name the user.
    AdminRepository(session, None).set_audit_actor(tenant.id, "tenant.create", actor)
    return tenant


def _tenant(session: Session, viewer_tenant: str | None, tenant_id: str) -> Tenant:
    row = AdminRepository(session, viewer_tenant).tenant_for_update(tenant_id)
    if row is None:
        raise NotFound(f"No tenant {tenant_id}.")
    return row


def update_quotas(session: Session, actor: str, tenant_id: str, values: dict[str, str]) -> Tenant:
    """Set a tenant's quotas (platform admins only; the caller checks the role)."""
    tenant = _tenant(session, None, tenant_id)
    changed: dict[str, int] = {}
    for field, (low, high) in QUOTAS.items():
        raw = values.get(field, "").strip()
        if not raw:
            continue
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise BadRequest(f"{field} must be a whole number from {low} to {high}.", param=field)
        if getattr(tenant, field) != int(raw):
            changed[field] = int(raw)
            setattr(tenant, field, int(raw))
    if changed:
        audit(session, actor, tenant.id, "tenant.update_quotas", ("tenant", tenant.id), changed)
    session.flush()
    return tenant


def set_tenant_disabled(session: Session, actor: str, tenant_id: str, disabled: bool) -> Tenant:
    """Disable a tenant (its keys stop authenticating, its users cannot log in) or enable it."""
    tenant = _tenant(session, None, tenant_id)
    if disabled and tenant.disabled_at is None:
        tenant.disabled_at = now_ts()
        audit(session, actor, tenant.id, "tenant.disable", ("tenant", tenant.id))
    elif not disabled and tenant.disabled_at is not None:
        tenant.disabled_at = None
        audit(session, actor, tenant.id, "tenant.enable", ("tenant", tenant.id))
    session.flush()
    return tenant

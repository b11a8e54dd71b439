"""What only the dashboard does: users, their logins and sessions, tenant quotas and disabling.

Everything else the dashboard changes (jobs, keys, webhooks, models) goes through the API's own
services with an :class:`AdminPrincipal`, so the rules and the audit rows are the API's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from api.admin import sessions
from api.admin.repository import AdminRepository
from api.errors import BadRequest, NotFound, PermissionDenied
from api.tenancy.service import Principal
from common import ids
from models_db.base import now_ts
from models_db.models import AdminSession, AuditLogEntry, Tenant, User

ROLES = ("platform-admin", "tenant-admin", "member")
# Who may give which role: nobody assigns a role above their own.
RANK = {"member": 0, "tenant-admin": 1, "platform-admin": 2}
TENANT_ROLES = ("tenant-admin", "member")
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


class Manager(Protocol):
    """Who manages users: a dashboard user (``auth.Viewer``) or the CLI."""

    @property
    def user_id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def tenant_id(self) -> str | None: ...

    @property
    def actor(self) -> str: ...


@dataclass(frozen=True)
class CliManager:
    """The ``loraplex admin`` commands: whoever can run them owns the database anyway."""

    user_id: str = ""
    role: str = "platform-admin"
    tenant_id: str | None = None
    actor: str = "cli"


CLI = CliManager()


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


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")


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
    _check_password(password)
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
        # Its users' sessions end for good: enabling the tenant again does not revive them.
        AdminRepository(session, None).revoke_sessions(
            tenant.disabled_at, "tenant_disabled", tenant_id=tenant.id
        )
        audit(session, actor, tenant.id, "tenant.disable", ("tenant", tenant.id))
    elif not disabled and tenant.disabled_at is not None:
        tenant.disabled_at = None
        audit(session, actor, tenant.id, "tenant.enable", ("tenant", tenant.id))
    session.flush()
    return tenant


# --- sessions -----------------------------------------------------------------------------


def start_session(session: Session, user: User, nonce: str, issued_at: int, lifetime: int) -> None:
    """Record a login's session (and forget this user's expired ones)."""
    repo = AdminRepository(session, None)
    repo.delete_expired_sessions(user.id, issued_at)
    repo.add_session(
        AdminSession(
            id=sessions.session_id(nonce),
            user_id=user.id,
            created_at=issued_at,
            expires_at=issued_at + lifetime,
            last_seen_at=issued_at,
        )
    )
    session.flush()


def end_session(session: Session, user_id: str, tenant_id: str | None, nonce: str) -> None:
    """Logout: this session's row is revoked, so its cookie is refused on every replica."""
    AdminRepository(session, None).revoke_sessions(
        now_ts(), "logout", session_id=sessions.session_id(nonce)
    )
    audit(session, f"user:{user_id}", tenant_id, "user.logout", ("user", user_id))


# --- users, as managed by a tenant admin or a platform admin ---------------------------------


def _require_manager(manager: Manager) -> None:
    if RANK.get(manager.role, -1) < RANK["tenant-admin"]:
        raise PermissionDenied("Members cannot manage users; ask a tenant admin.")


def _may_give(manager: Manager, role: str) -> None:
    _require_manager(manager)
    if role not in RANK:
        raise BadRequest(f"The role must be one of {', '.join(ROLES)}.", param="role")
    if RANK[role] > RANK.get(manager.role, -1):
        raise PermissionDenied(f"A {manager.role} cannot give the role {role}.")


def managed_user(session: Session, manager: Manager, user_id: str) -> User:
    """A user the manager may change: another tenant's user is not found (404), and nobody
    manages someone of a higher role."""
    _require_manager(manager)
    user = AdminRepository(session, manager.tenant_id).visible_user(user_id, for_update=True)
    if user is None:
        raise NotFound(f"No user {user_id}.")
    if RANK.get(user.role, 99) > RANK.get(manager.role, -1):
        raise PermissionDenied(f"A {manager.role} cannot manage a {user.role}.")
    return user


def create_user_as(
    session: Session,
    manager: Manager,
    email: str,
    password: str,
    role: str,
    tenant_id: str | None,
) -> User:
    """Create a user on behalf of ``manager``: a tenant admin only in their own tenant, and
    only with a role no higher than theirs."""
    _may_give(manager, role)
    if role == "platform-admin":
        tenant_id = None
    else:
        tenant_id = tenant_id or manager.tenant_id
        if not tenant_id:
            raise UserError(f"a {role} belongs to a tenant: choose one")
        if AdminRepository(session, manager.tenant_id).tenant(tenant_id) is None:
            raise NotFound(f"No tenant {tenant_id}.")
    return create_user(session, email, password, role, tenant_id, actor=manager.actor)


def set_user_disabled(session: Session, manager: Manager, user_id: str, disabled: bool) -> User:
    """Disable a user (their sessions end, their logins are refused) or enable them again."""
    user = managed_user(session, manager, user_id)
    if disabled and user.id == manager.user_id:
        raise BadRequest("You cannot disable your own account.")
    now = now_ts()
    if disabled and user.disabled_at is None:
        user.disabled_at = now
        ended = AdminRepository(session, None).revoke_sessions(now, "disabled", user_id=user.id)
        audit(
            session,
            manager.actor,
            user.tenant_id,
            "user.disable",
            ("user", user.id),
            {"sessions_ended": ended},
        )
    elif not disabled and user.disabled_at is not None:
        user.disabled_at = None
        audit(session, manager.actor, user.tenant_id, "user.enable", ("user", user.id))
    session.flush()
    return user


def reset_password(session: Session, manager: Manager, user_id: str, password: str) -> User:
    """Set a new password; every session of the user ends."""
    user = managed_user(session, manager, user_id)
    _check_password(password)
    user.password_hash = sessions.hash_password(password)
    ended = AdminRepository(session, None).revoke_sessions(
        now_ts(), "password_reset", user_id=user.id
    )
    audit(
        session,
        manager.actor,
        user.tenant_id,
        "user.reset_password",
        ("user", user.id),
        {"sessions_ended": ended},
    )
    session.flush()
    return user


def end_sessions(session: Session, manager: Manager, user_id: str) -> int:
    """Log a user out everywhere (the password stays); returns how many sessions ended."""
    user = managed_user(session, manager, user_id)
    ended = AdminRepository(session, None).revoke_sessions(now_ts(), "ended", user_id=user.id)
    audit(
        session,
        manager.actor,
        user.tenant_id,
        "user.end_sessions",
        ("user", user.id),
        {"sessions_ended": ended},
    )
    return ended


def change_role(session: Session, manager: Manager, user_id: str, role: str) -> User:
    """Switch a tenant's user between tenant admin and member (never above the manager's
    role; platform admins are made with ``create-user``, not promoted)."""
    _may_give(manager, role)
    user = managed_user(session, manager, user_id)
    if user.id == manager.user_id:
        raise BadRequest("You cannot change your own role.")
    if user.tenant_id is None or role not in TENANT_ROLES:
        raise BadRequest(
            f"Only a tenant's users change roles, to one of {', '.join(TENANT_ROLES)}."
        )
    if user.role != role:
        audit(
            session,
            manager.actor,
            user.tenant_id,
            "user.change_role",
            ("user", user.id),
            {"from": user.role, "to": role},
        )
        user.role = role
    session.flush()
    return user

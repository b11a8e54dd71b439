"""The dashboard's user rules and server-side sessions, on a migrated SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import migrations
from api.admin import service, sessions
from api.admin.repository import AdminRepository
from api.errors import BadRequest, NotFound, PermissionDenied
from api.tenancy.service import create_tenant
from models_db.base import now_ts
from models_db.models import AdminSession, AuditLogEntry, Tenant, User
from models_db.session import make_engine, make_session_factory, transaction

PASSWORD = "a long enough password"


@dataclass(frozen=True)
class Acting:
    """What a logged-in dashboard user looks like to the service (auth.Viewer's fields)."""

    user_id: str
    role: str
    tenant_id: str | None

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"


def acting(user: User) -> Acting:
    return Acting(user.id, user.role, None if user.role == "platform-admin" else user.tenant_id)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'admin.db'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def db(factory: sessionmaker[Session]) -> Iterator[Session]:
    with transaction(factory) as session:
        yield session


def _tenant(db: Session, slug: str) -> Tenant:
    return create_tenant(db, f"Tenant {slug}", slug)


def _user(db: Session, role: str, tenant: Tenant | None, name: str) -> User:
    return service.create_user(
        db, f"{name}@example.com", PASSWORD, role, tenant.id if tenant else None
    )


def _login(db: Session, user: User, now: int | None = None, lifetime: int = 3600) -> str:
    nonce = sessions.new_nonce()
    service.start_session(db, user, nonce, now or now_ts(), lifetime)
    return nonce


def _row(db: Session, nonce: str) -> AdminSession:
    row = db.get(AdminSession, sessions.session_id(nonce))
    assert row is not None
    db.refresh(row)
    return row


def _live(db: Session, nonce: str) -> bool:
    row = _row(db, nonce)
    return row.revoked_at is None and row.expires_at >= now_ts()


def test_tenant_admin_stays_within_their_tenant_and_role(db: Session) -> None:
    mine, theirs = _tenant(db, "mine"), _tenant(db, "theirs")
    boss = acting(_user(db, "tenant-admin", mine, "boss"))
    stranger = _user(db, "member", theirs, "stranger")

    with pytest.raises(PermissionDenied):
        service.create_user_as(db, boss, "root@example.com", PASSWORD, "platform-admin", None)
    with pytest.raises(NotFound):  # another tenant does not exist for them
        service.create_user_as(db, boss, "x@example.com", PASSWORD, "member", theirs.id)
    made = service.create_user_as(db, boss, "New@Example.com", PASSWORD, "member", None)
    assert (made.tenant_id, made.role, made.email) == (mine.id, "member", "new@example.com")

    for act in (
        lambda: service.set_user_disabled(db, boss, stranger.id, True),
        lambda: service.reset_password(db, boss, stranger.id, PASSWORD + "!"),
        lambda: service.end_sessions(db, boss, stranger.id),
        lambda: service.change_role(db, boss, stranger.id, "member"),
    ):
        with pytest.raises(NotFound):
            act()
    with pytest.raises(PermissionDenied):
        service.change_role(db, boss, made.id, "platform-admin")
    assert service.change_role(db, boss, made.id, "tenant-admin").role == "tenant-admin"
    assert [u.email for u in AdminRepository(db, mine.id).users()] == [
        "boss@example.com",
        "new@example.com",
    ]


def test_members_manage_nobody_and_nobody_locks_themselves_out(db: Session) -> None:
    tenant = _tenant(db, "acme")
    member = acting(_user(db, "member", tenant, "member"))
    peer = _user(db, "member", tenant, "peer")
    with pytest.raises(PermissionDenied):
        service.create_user_as(db, member, "x@example.com", PASSWORD, "member", None)
    with pytest.raises(PermissionDenied):
        service.set_user_disabled(db, member, peer.id, True)

    root = acting(_user(db, "platform-admin", None, "root"))
    with pytest.raises(BadRequest):
        service.set_user_disabled(db, root, root.user_id, True)
    with pytest.raises(BadRequest):  # platform admins are not made by promotion
        service.change_role(db, root, peer.id, "platform-admin")
    with pytest.raises(service.UserError):
        service.create_user_as(db, root, "y@example.com", PASSWORD, "member", None)
    with pytest.raises(service.UserError):
        service.reset_password(db, root, peer.id, "short")


def test_disable_reset_and_end_sessions_revoke_the_rows(db: Session) -> None:
    tenant = _tenant(db, "acme")
    root = acting(_user(db, "platform-admin", None, "root"))
    user = _user(db, "tenant-admin", tenant, "alice")
    other = _user(db, "member", tenant, "bob")
    first, second, bobs = _login(db, user), _login(db, user), _login(db, other)

    assert service.end_sessions(db, root, user.id) == 2
    assert not _live(db, first) and not _live(db, second) and _live(db, bobs)
    assert _row(db, first).revoked_reason == "ended"

    third = _login(db, user)
    old_hash = user.password_hash
    service.reset_password(db, root, user.id, "a brand new password")
    assert not _live(db, third) and _row(db, third).revoked_reason == "password_reset"
    assert user.password_hash != old_hash
    assert service.check_login(db, "alice@example.com", PASSWORD) is None
    assert service.check_login(db, "alice@example.com", "a brand new password") is not None

    fourth = _login(db, user)
    service.set_user_disabled(db, root, user.id, True)
    assert not _live(db, fourth)
    assert service.check_login(db, "alice@example.com", "a brand new password") is None
    service.set_user_disabled(db, root, user.id, False)
    assert not _live(db, fourth)  # enabling again does not revive old sessions

    service.end_session(db, other.id, tenant.id, bobs)  # logout
    assert _row(db, bobs).revoked_reason == "logout"

    actions = db.scalars(
        select(AuditLogEntry.action).where(AuditLogEntry.target_id == user.id)
    ).all()
    for action in ("user.end_sessions", "user.reset_password", "user.disable", "user.enable"):
        assert action in actions


def test_disabling_a_tenant_ends_its_users_sessions(db: Session) -> None:
    acme, other = _tenant(db, "acme"), _tenant(db, "other")
    alice, carol = _user(db, "member", acme, "alice"), _user(db, "member", other, "carol")
    alices, carols = _login(db, alice), _login(db, carol)
    service.set_tenant_disabled(db, "user:root", acme.id, True)
    assert not _live(db, alices) and _row(db, alices).revoked_reason == "tenant_disabled"
    assert _live(db, carols)


def test_expired_rows_are_forgotten_at_the_next_login(db: Session) -> None:
    user = _user(db, "platform-admin", None, "root")
    old = _login(db, user, now=now_ts() - 7200, lifetime=3600)
    fresh = _login(db, user)
    assert db.get(AdminSession, sessions.session_id(old)) is None
    assert _live(db, fresh)
    assert AdminRepository(db, None).live_session_counts([user.id], now_ts()) == {user.id: 1}


def test_tenant_creation_names_its_actor(db: Session) -> None:
    tenant = create_tenant(db, "By a person", actor="user:user-123")
    by_cli = create_tenant(db, "By the CLI")
    rows = dict(
        db.execute(
            select(AuditLogEntry.target_id, AuditLogEntry.actor).where(
                AuditLogEntry.action == "tenant.create"
            )
        ).all()
    )
    assert rows == {tenant.id: "user:user-123", by_cli.id: "cli"}


def test_cookie_carries_the_nonce_the_row_is_keyed_by() -> None:
    signer = sessions.SessionSigner("s" * 32, 3600)
    nonce = sessions.new_nonce()
    cookie = signer.issue("user-1", "hash", now=1_000_000, nonce=nonce)
    claims = signer.parse(cookie, now=1_000_001)
    assert claims is not None and claims.nonce == nonce
    assert sessions.session_id(nonce) != nonce and len(sessions.session_id(nonce)) == 64

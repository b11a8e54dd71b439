"""Users: the list, creating one, disabling, password resets and ending their sessions.

Members get 403 here; a tenant admin sees and changes their own tenant's users only (another
tenant's user is a 404) and never gives a role above their own. The rules are in the service.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session

from api.admin import service
from api.admin.auth import ManagerDep, Viewer, WriterDep
from api.admin.web import admin_router, redirect, render
from api.deps import SessionDep
from api.errors import NotFound
from models_db.base import now_ts
from models_db.models import User

router = admin_router()

NOTICES = {
    "created": "User created.",
    "disabled": "User disabled: their sessions ended and they cannot log in.",
    "enabled": "User enabled.",
    "password": "Password changed: every session of this user ended.",
    "sessions": "Every session of this user ended.",
    "role": "Role changed.",
}


def _roles(viewer: Viewer) -> list[str]:
    """The roles this viewer may give, highest first."""
    return [r for r in service.ROLES if service.RANK[r] <= service.RANK[viewer.role]]


def _list_page(
    request: Request,
    session: Session,
    viewer: Viewer,
    *,
    tenant: str = "",
    error: str | None = None,
    form: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    repo = viewer.repository(session)
    users = repo.users(tenant or None)
    tenants = repo.tenants()
    return render(
        request,
        "users.html",
        status_code=status_code,
        viewer=viewer,
        users=users,
        live_sessions=repo.live_session_counts([u.id for u in users], now_ts()),
        tenants=tenants,
        tenant_names={t.id: t.slug for t in tenants},
        tenant_filter=tenant,
        roles=_roles(viewer),
        error=error,
        form=form or {"email": "", "role": "member", "tenant_id": tenant},
    )


@router.get("/users")
def users(
    request: Request, viewer: ManagerDep, session: SessionDep, tenant: str = ""
) -> HTMLResponse:
    """The users this viewer manages (a platform admin: everyone, or one tenant's)."""
    return _list_page(request, session, viewer, tenant=tenant)


@router.post("/users", response_model=None)
def create_user(
    request: Request,
    viewer: WriterDep,
    session: SessionDep,
    email: Annotated[str, Form(max_length=320)],
    password: Annotated[str, Form(max_length=1000)],
    role: Annotated[str, Form(max_length=20)],
    tenant_id: Annotated[str, Form(max_length=40)] = "",
) -> HTMLResponse | RedirectResponse:
    """Create a user (a tenant admin: in their own tenant, never above their own role)."""
    try:
        user = service.create_user_as(session, viewer, email, password, role, tenant_id or None)
    except service.UserError as exc:
        form = {"email": email, "role": role, "tenant_id": tenant_id}
        return _list_page(request, session, viewer, error=str(exc), form=form, status_code=400)
    return redirect(f"/admin/users/{user.id}?notice=created")


def _user(session: Session, viewer: Viewer, user_id: str) -> User:
    user = viewer.repository(session).visible_user(user_id)
    if user is None:
        raise NotFound(f"No user {user_id}.")
    return user


def _user_page(
    request: Request,
    session: Session,
    viewer: Viewer,
    user: User,
    *,
    notice: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    repo = viewer.repository(session)
    tenant = repo.tenant(user.tenant_id) if user.tenant_id else None
    return render(
        request,
        "user.html",
        status_code=status_code,
        viewer=viewer,
        user=user,
        tenant=tenant,
        logins=repo.sessions_of(user.id),
        now=now_ts(),
        roles=[r for r in service.TENANT_ROLES if r in _roles(viewer)],
        notice=NOTICES.get(notice or ""),
        error=error,
    )


@router.get("/users/{user_id}")
def user_detail(
    request: Request,
    user_id: str,
    viewer: ManagerDep,
    session: SessionDep,
    notice: str | None = None,
) -> HTMLResponse:
    """One user: role, state, recent sessions, and what can be done to them."""
    return _user_page(request, session, viewer, _user(session, viewer, user_id), notice=notice)


@router.post("/users/{user_id}/disable")
def disable_user(user_id: str, viewer: WriterDep, session: SessionDep) -> RedirectResponse:
    """Disable a user: their sessions end and their logins are refused."""
    service.set_user_disabled(session, viewer, user_id, True)
    return redirect(f"/admin/users/{user_id}?notice=disabled")


@router.post("/users/{user_id}/enable")
def enable_user(user_id: str, viewer: WriterDep, session: SessionDep) -> RedirectResponse:
    """Enable a disabled user."""
    service.set_user_disabled(session, viewer, user_id, False)
    return redirect(f"/admin/users/{user_id}?notice=enabled")


@router.post("/users/{user_id}/password", response_model=None)
def reset_password(
    request: Request,
    user_id: str,
    viewer: WriterDep,
    session: SessionDep,
    password: Annotated[str, Form(max_length=1000)],
) -> HTMLResponse | RedirectResponse:
    """Set a new password; every session of the user ends (yours too, if it is you)."""
    try:
        service.reset_password(session, viewer, user_id, password)
    except service.UserError as exc:
        user = _user(session, viewer, user_id)
        return _user_page(request, session, viewer, user, error=str(exc), status_code=400)
    return redirect(f"/admin/users/{user_id}?notice=password")


@router.post("/users/{user_id}/end-sessions")
def end_sessions(user_id: str, viewer: WriterDep, session: SessionDep) -> RedirectResponse:
    """Log the user out everywhere, keeping their password."""
    service.end_sessions(session, viewer, user_id)
    return redirect(f"/admin/users/{user_id}?notice=sessions")


@router.post("/users/{user_id}/role")
def change_role(
    user_id: str,
    viewer: WriterDep,
    session: SessionDep,
    role: Annotated[str, Form(max_length=20)],
) -> RedirectResponse:
    """Make a tenant's user a tenant admin or a member."""
    service.change_role(session, viewer, user_id, role)
    return redirect(f"/admin/users/{user_id}?notice=role")

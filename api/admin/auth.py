"""Who is looking at the dashboard: the session dependencies, roles, CSRF, login and logout."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session

from api.admin import service, sessions
from api.admin.repository import AdminRepository
from api.admin.web import (
    COOKIE_PATH,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    AdminState,
    LoginRequired,
    admin_router,
    admin_state,
    redirect,
    render,
)
from api.deps import SessionDep
from api.errors import BadRequest, NotFound, PermissionDenied, RateLimited
from models_db.base import now_ts

AdminDep = Annotated[AdminState, Depends(admin_state)]
# A session's last_seen_at is written at most this often, not on every request.
_SEEN_INTERVAL_SECONDS = 60


@dataclass(frozen=True)
class Viewer:
    """The logged-in user of this request."""

    user_id: str
    email: str
    role: str
    tenant_id: str | None  # None: a platform admin, who sees every tenant
    nonce: str
    csrf_token: str

    @property
    def is_platform(self) -> bool:
        return self.role == "platform-admin"

    @property
    def can_write(self) -> bool:
        return self.role != "member"

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"

    def principal(self, tenant_id: str) -> service.AdminPrincipal:
        """The principal the API's services see when this user acts inside ``tenant_id``."""
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            raise NotFound("Not found.")
        return service.AdminPrincipal(
            tenant_id=tenant_id,
            tenant_slug="",
            key_id="",
            scopes=frozenset({"admin"}),
            user_id=self.user_id,
        )

    def repository(self, session: Session) -> AdminRepository:
        return AdminRepository(session, self.tenant_id)


def current_viewer(request: Request, session: SessionDep, admin: AdminDep) -> Viewer:
    cookie = request.cookies.get(SESSION_COOKIE)
    claims = admin.signer.parse(cookie) if cookie else None
    if cookie is None or claims is None:
        raise LoginRequired
    found = AdminRepository(session, None).login_session(
        claims.user_id, sessions.session_id(claims.nonce)
    )
    if found is None:
        raise LoginRequired
    user, tenant, login = found
    # The signature is the first gate: a forged cookie is refused whatever the rows say.
    if not admin.signer.verify(cookie, user.password_hash) or user.disabled_at is not None:
        raise LoginRequired
    if user.role != "platform-admin" and (tenant is None or tenant.disabled_at is not None):
        raise LoginRequired
    # Then the session's row, which logout, a password reset or disabling revoked on every
    # replica at once.
    now = now_ts()
    if login is None or login.revoked_at is not None or login.expires_at < now:
        raise LoginRequired
    if login.last_seen_at is None or now - login.last_seen_at >= _SEEN_INTERVAL_SECONDS:
        login.last_seen_at = now
    return Viewer(
        user_id=user.id,
        email=user.email,
        role=user.role,
        tenant_id=None if user.role == "platform-admin" else user.tenant_id,
        nonce=claims.nonce,
        csrf_token=admin.signer.csrf_token(claims.nonce),
    )


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


def _refuse_nul(*values: object) -> None:
    # No database column can store NUL: a 400 here, not a 500 from the query.
    if any(isinstance(v, str) and "\x00" in v for v in values):
        raise BadRequest("Form fields cannot contain NUL characters.")


async def checked_form(request: Request, viewer: ViewerDep, admin: AdminDep) -> Viewer:
    """Every POST carries the session's CSRF token in the form field ``csrf_token``."""
    form = await request.form()
    token = form.get("csrf_token")
    if not isinstance(token, str) or not admin.signer.csrf_ok(viewer.nonce, token):
        raise PermissionDenied(
            "The form's CSRF token is missing or invalid; reload the page and try again.",
            code="csrf_failed",
        )
    _refuse_nul(*form.values())
    return viewer


PosterDep = Annotated[Viewer, Depends(checked_form)]


def require_writer(viewer: PosterDep) -> Viewer:
    if not viewer.can_write:
        raise PermissionDenied("Members have read-only access; ask a tenant admin.")
    return viewer


def require_platform(viewer: PosterDep) -> Viewer:
    if not viewer.is_platform:
        raise PermissionDenied("Only platform admins can do this.")
    return viewer


def require_manager(viewer: ViewerDep) -> Viewer:
    """Pages that only managers see (the users page): members get 403 even to look."""
    if not viewer.can_write:
        raise PermissionDenied("Members cannot manage users; ask a tenant admin.")
    return viewer


WriterDep = Annotated[Viewer, Depends(require_writer)]
PlatformDep = Annotated[Viewer, Depends(require_platform)]
ManagerDep = Annotated[Viewer, Depends(require_manager)]


def set_cookie(
    request: Request, response: Response, admin: AdminState, name: str, value: str
) -> None:
    mode = admin.settings.admin_secure_cookies
    secure = mode == "always" or (mode == "auto" and request.url.scheme == "https")
    response.set_cookie(
        name,
        value,
        max_age=admin.signer.lifetime if name == SESSION_COOKIE else 3600,
        path=COOKIE_PATH,
        secure=secure,
        httponly=True,
        samesite="lax",
    )


# --- login and logout -------------------------------------------------------------------------

router = admin_router()


def _safe_next(target: str | None) -> str:
    # Only a path inside the dashboard: never another site ("//evil", "/\\evil").
    if target and target.startswith("/admin") and "//" not in target and "\\" not in target:
        return target
    return "/admin"


def _login_page(
    request: Request,
    admin: AdminState,
    *,
    binding: str,
    next_url: str,
    email: str = "",
    error: str | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    return render(
        request,
        "login.html",
        status_code=status_code,
        headers=headers,
        viewer=None,
        csrf_token=admin.signer.csrf_token("login:" + binding),
        next_url=next_url,
        email=email,
        error=error,
    )


@router.get("/login")
def login_form(request: Request, admin: AdminDep, next: str | None = None) -> HTMLResponse:
    """The login form."""
    binding = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(18)
    response = _login_page(request, admin, binding=binding, next_url=_safe_next(next))
    set_cookie(request, response, admin, LOGIN_COOKIE, binding)
    return response


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    admin: AdminDep,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=1000)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/admin",
) -> Response:
    """Check the email and password; on success start a session."""
    binding = request.cookies.get(LOGIN_COOKIE)
    if binding is None or not admin.signer.csrf_ok("login:" + binding, csrf_token):
        raise PermissionDenied("The login form expired; reload it and try again.")
    _refuse_nul(email)
    # The client address is uvicorn's: behind a proxy, --forwarded-allow-ips must name only
    # the proxy, or a forged X-Forwarded-For would pick a fresh address per guess.
    client = request.client.host if request.client else "unknown"
    email = email.strip().lower()
    # Counted before the (slow) password check, so parallel guesses cannot all slip in.
    wait = admin.throttle.attempt(email, client)
    if wait:
        raise RateLimited(
            f"Too many failed logins; try again in {wait} seconds.",
            headers={"Retry-After": str(wait)},
        )
    user = service.check_login(session, email, password) if email and password else None
    if user is None:
        return _login_page(
            request,
            admin,
            binding=binding,
            next_url=_safe_next(next),
            email=email,
            error="Wrong email or password.",
            status_code=401,
        )
    admin.throttle.succeeded(email, client)
    nonce, issued = sessions.new_nonce(), now_ts()
    service.start_session(session, user, nonce, issued, admin.signer.lifetime)
    cookie = admin.signer.issue(user.id, user.password_hash, now=issued, nonce=nonce)
    response = redirect(_safe_next(next))
    set_cookie(request, response, admin, SESSION_COOKIE, cookie)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/logout")
def logout(viewer: PosterDep, session: SessionDep) -> RedirectResponse:
    """End this session: its cookie is refused from now on, on every replica, even if replayed."""
    service.end_session(session, viewer.user_id, viewer.tenant_id, viewer.nonce)
    response = redirect("/admin/login")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response

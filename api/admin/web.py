"""The dashboard's plumbing: its state, HTML rendering, error pages and security headers."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from api.admin.sessions import LoginThrottle, SessionSigner
from api.admin.settings import AdminSettings
from api.errors import AppError
from api.services import Services

HERE = Path(__file__).parent
SESSION_COOKIE = "lpx_admin_session"
LOGIN_COOKIE = "lpx_admin_login"  # binds the login form's CSRF token before a session exists
COOKIE_PATH = "/admin"

# Pages only load what the dashboard serves itself; no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _ts(value: int | None) -> str:
    if value is None:
        return "—"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _day(value: int) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d")


def _num(value: int | float | None) -> str:
    return "—" if value is None else f"{value:,}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)  # pragma: no cover - the loop always returns


def make_templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ts=_ts, day=_day, num=_num, bytes=_bytes)
    return env


@dataclass
class AdminState:
    """Built once per process by the admin router's lifespan."""

    settings: AdminSettings
    server_secret: str  # signs the gateway's /internal/replicas request
    signer: SessionSigner
    throttle: LoginThrottle
    templates: Environment


@asynccontextmanager
async def admin_lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs inside the app's lifespan, so the services (and the server secret) exist.
    services: Services = app.state.services
    settings = AdminSettings()
    app.state.admin = AdminState(
        settings=settings,
        server_secret=services.settings.secret_key,
        signer=SessionSigner(
            services.settings.secret_key, int(settings.admin_session_hours * 3600)
        ),
        throttle=LoginThrottle(settings.admin_login_attempts, settings.admin_login_window_seconds),
        templates=make_templates(),
    )
    yield


def admin_state(request: Request) -> AdminState:
    state: AdminState = request.app.state.admin
    return state


class LoginRequired(Exception):
    """No valid session: pages redirect to the login form."""


def render(
    request: Request,
    template: str,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    html = (
        admin_state(request)
        .templates.get_template(template)
        .render(request_path=request.url.path, **context)
    )
    return HTMLResponse(html, status_code, headers={**SECURITY_HEADERS, **(headers or {})})


def _error_page(request: Request, status_code: int, message: str) -> Response:
    headers = {"Retry-After": "60"} if status_code == 429 else None
    if request.url.path.endswith(".json"):
        return JSONResponse(
            {"error": message}, status_code, headers={**SECURITY_HEADERS, **(headers or {})}
        )
    return render(
        request,
        "error.html",
        status_code=status_code,
        headers=headers,
        viewer=None,
        status=status_code,
        message=message,
    )


def _validation_message(exc: RequestValidationError) -> str:
    errors = list(exc.errors())
    if not errors:
        return "Invalid form."
    field = ".".join(str(p) for p in errors[0].get("loc", ())[1:]) or "form"
    return f"Invalid value for {field}: {errors[0].get('msg', 'invalid')}."


class AdminRoute(APIRoute):
    """Errors of dashboard routes become HTML pages (the API's handlers answer JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                if request.method == "GET" and not request.url.path.endswith(".json"):
                    target = request.url.path
                    if request.url.query:
                        target += "?" + request.url.query
                    return RedirectResponse("/admin/login?" + urlencode({"next": target}), 303)
                return _error_page(request, 401, "Your session has ended; log in again.")
            except AppError as exc:
                response = _error_page(request, exc.status_code, exc.message)
                if exc.headers:
                    response.headers.update(exc.headers)
                return response
            except RequestValidationError as exc:
                return _error_page(request, 400, _validation_message(exc))

        return guarded


def admin_router() -> APIRouter:
    """A router of dashboard pages under /admin: HTML errors, and no place in the API's
    OpenAPI document."""
    return APIRouter(prefix="/admin", route_class=AdminRoute, include_in_schema=False)


def redirect(url: str) -> RedirectResponse:
    """After a successful POST: see the result with a GET (reloading does not repeat it)."""
    return RedirectResponse(url, 303, headers={"Cache-Control": "no-store"})

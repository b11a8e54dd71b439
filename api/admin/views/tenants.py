"""Tenants (create, quotas, disable), their users (managed on the users page) and API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session

from api.admin import service
from api.admin.auth import PlatformDep, Viewer, ViewerDep, WriterDep
from api.admin.web import admin_router, redirect, render
from api.deps import ServicesDep, SessionDep
from api.errors import BadRequest, NotFound
from api.tenancy import keys
from api.tenancy.service import TenancyError, create_api_key, create_tenant, revoke_api_key
from models_db.models import Tenant

router = admin_router()

NOTICES = {
    "created": "Tenant created.",
    "quotas": "Quotas saved.",
    "disabled": "Tenant disabled: its API keys stop working and its users cannot log in.",
    "enabled": "Tenant enabled.",
    "revoked": "API key revoked.",
}


def _tenant(session: Session, viewer: Viewer, tenant_id: str) -> Tenant:
    row = viewer.repository(session).tenant(tenant_id)
    if row is None:
        raise NotFound(f"No tenant {tenant_id}.")
    return row


@router.get("/tenants")
def tenants(request: Request, viewer: ViewerDep, session: SessionDep) -> HTMLResponse:
    """Every tenant (a tenant's users see their own)."""
    return render(
        request,
        "tenants.html",
        viewer=viewer,
        tenants=viewer.repository(session).tenants(),
        error=None,
        form={"name": "", "slug": ""},
    )


@router.post("/tenants", response_model=None)
def new_tenant(
    request: Request,
    viewer: PlatformDep,
    session: SessionDep,
    name: Annotated[str, Form(max_length=200)],
    slug: Annotated[str, Form(max_length=40)] = "",
) -> HTMLResponse | RedirectResponse:
    """Create a tenant."""
    try:
        tenant = create_tenant(session, name, slug.strip() or None, actor=viewer.actor)
    except TenancyError as exc:
        return render(
            request,
            "tenants.html",
            status_code=400,
            viewer=viewer,
            tenants=viewer.repository(session).tenants(),
            error=str(exc),
            form={"name": name, "slug": slug},
        )
    return redirect(f"/admin/tenants/{tenant.id}?notice=created")


def _tenant_page(
    request: Request,
    session: Session,
    viewer: Viewer,
    tenant: Tenant,
    *,
    notice: str | None = None,
    error: str | None = None,
    created_key: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    repo = viewer.repository(session)
    return render(
        request,
        "tenant.html",
        status_code=status_code,
        viewer=viewer,
        tenant=tenant,
        users=repo.users_of(tenant.id),
        api_keys=repo.keys_of(tenant.id),
        quotas=list(service.QUOTAS),
        scopes=keys.SCOPES,
        roles=[r for r in service.ROLES if r != "platform-admin"],
        notice=NOTICES.get(notice or ""),
        error=error,
        created_key=created_key,
    )


@router.get("/tenants/{tenant_id}")
def tenant_detail(
    request: Request,
    tenant_id: str,
    viewer: ViewerDep,
    session: SessionDep,
    notice: str | None = None,
) -> HTMLResponse:
    """One tenant: quotas, users, API keys."""
    return _tenant_page(
        request, session, viewer, _tenant(session, viewer, tenant_id), notice=notice
    )


QuotaField = Annotated[str, Form(max_length=20)]


@router.post("/tenants/{tenant_id}/quotas")
def update_quotas(
    tenant_id: str,
    viewer: PlatformDep,
    session: SessionDep,
    max_concurrent_jobs: QuotaField = "",
    max_stored_bytes: QuotaField = "",
    max_requests_per_minute: QuotaField = "",
    max_tokens_per_minute: QuotaField = "",
) -> RedirectResponse:
    """Change a tenant's quotas (an empty field keeps its value)."""
    values = {
        "max_concurrent_jobs": max_concurrent_jobs,
        "max_stored_bytes": max_stored_bytes,
        "max_requests_per_minute": max_requests_per_minute,
        "max_tokens_per_minute": max_tokens_per_minute,
    }
    service.update_quotas(session, viewer.actor, tenant_id, values)
    return redirect(f"/admin/tenants/{tenant_id}?notice=quotas")


@router.post("/tenants/{tenant_id}/disable")
def disable_tenant(tenant_id: str, viewer: PlatformDep, session: SessionDep) -> RedirectResponse:
    """Disable a tenant."""
    service.set_tenant_disabled(session, viewer.actor, tenant_id, True)
    return redirect(f"/admin/tenants/{tenant_id}?notice=disabled")


@router.post("/tenants/{tenant_id}/enable")
def enable_tenant(tenant_id: str, viewer: PlatformDep, session: SessionDep) -> RedirectResponse:
    """Enable a disabled tenant."""
    service.set_tenant_disabled(session, viewer.actor, tenant_id, False)
    return redirect(f"/admin/tenants/{tenant_id}?notice=enabled")


@router.post("/tenants/{tenant_id}/keys")
def create_key(
    request: Request,
    tenant_id: str,
    viewer: WriterDep,
    session: SessionDep,
    services: ServicesDep,
    name: Annotated[str, Form(max_length=200)] = "",
    scopes: Annotated[list[str] | None, Form()] = None,
) -> HTMLResponse:
    """Create an API key; the page that answers is the only place it is ever shown."""
    tenant = _tenant(session, viewer, tenant_id)
    try:
        created = create_api_key(
            session,
            services.settings.secret_key,
            tenant,
            name=name.strip(),
            scopes=tuple(scopes or ()),
            actor=viewer.actor,
        )
    except TenancyError as exc:
        raise BadRequest(str(exc), param="scopes") from None
    return _tenant_page(request, session, viewer, tenant, created_key=created.secret)


@router.post("/tenants/{tenant_id}/keys/{key_id}/revoke")
def revoke_key(
    tenant_id: str, key_id: str, viewer: WriterDep, session: SessionDep
) -> RedirectResponse:
    """Revoke an API key (requests with it fail within a second)."""
    principal = viewer.principal(tenant_id)
    if not revoke_api_key(session, principal.tenant_id, key_id, principal.actor):
        raise NotFound(f"No active API key {key_id}.")
    return redirect(f"/admin/tenants/{tenant_id}?notice=revoked")

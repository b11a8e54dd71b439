"""Files, models (retire) and webhook endpoints with their deliveries (replay)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from api.admin import gateway
from api.admin.auth import AdminDep, ViewerDep, WriterDep
from api.admin.web import admin_router, redirect, render
from api.catalog.repository import BaseModelRepository
from api.catalog.service import retire_model
from api.deps import SessionDep
from api.errors import NotFound
from api.webhooks import service as webhooks

router = admin_router()


@router.get("/files")
def files(request: Request, viewer: ViewerDep, session: SessionDep) -> HTMLResponse:
    """Dataset files with what validation found (format, examples, size)."""
    repo = viewer.repository(session)
    return render(
        request,
        "files.html",
        viewer=viewer,
        files=repo.files(),
        tenant_names={t.id: t.slug for t in repo.tenants()},
    )


@router.get("/models")
def models(
    request: Request, viewer: ViewerDep, session: SessionDep, admin: AdminDep, notice: str = ""
) -> HTMLResponse:
    """Base models and fine-tuned models, with where each adapter is loaded."""
    repo = viewer.repository(session)
    fleet = gateway.fetch(admin.settings.gateway_url, admin.server_secret)
    return render(
        request,
        "models.html",
        viewer=viewer,
        base_models=BaseModelRepository(session).list(include_disabled=True),
        tuned=repo.fine_tuned_models(),
        fleet=fleet,
        loaded=fleet.where_loaded(),
        tenant_names={t.id: t.slug for t in repo.tenants()},
        notice="Model retired." if notice == "retired" else None,
    )


@router.post("/models/retire")
def retire(
    viewer: WriterDep,
    session: SessionDep,
    model_id: Annotated[str, Form(max_length=400)],
) -> RedirectResponse:
    """Retire a fine-tuned model through the catalog's own service."""
    tenant_id = viewer.repository(session).model_tenant(model_id)
    if tenant_id is None:
        raise NotFound(f"The model '{model_id}' does not exist")
    retire_model(session, viewer.principal(tenant_id), model_id)
    return redirect("/admin/models?notice=retired")


@router.get("/webhooks")
def webhook_list(
    request: Request, viewer: ViewerDep, session: SessionDep, notice: str = ""
) -> HTMLResponse:
    """Webhook endpoints and their latest deliveries, with every attempt."""
    repo = viewer.repository(session)
    endpoints = [
        (
            endpoint,
            webhooks.list_deliveries(
                session, viewer.principal(endpoint.tenant_id), endpoint.id, None, 20
            )[0],
        )
        for endpoint in repo.endpoints()
    ]
    return render(
        request,
        "webhooks.html",
        viewer=viewer,
        endpoints=endpoints,
        tenant_names={t.id: t.slug for t in repo.tenants()},
        notice="Delivery queued again." if notice == "replayed" else None,
    )


@router.post("/webhooks/{endpoint_id}/deliveries/{delivery_id}/replay")
def replay(
    endpoint_id: str, delivery_id: str, viewer: WriterDep, session: SessionDep
) -> RedirectResponse:
    """Send a delivery again, through the webhooks service."""
    tenant_id = viewer.repository(session).endpoint_tenant(endpoint_id)
    if tenant_id is None:
        raise NotFound(f"No webhook endpoint found with id '{endpoint_id}'.")
    webhooks.replay(session, viewer.principal(tenant_id), endpoint_id, delivery_id)
    return redirect(f"/admin/webhooks?notice=replayed#{delivery_id}")

"""Usage per tenant by day, and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import HTMLResponse

from api.admin.auth import ViewerDep
from api.admin.web import admin_router, render
from api.deps import SessionDep
from models_db.base import now_ts

router = admin_router()

USAGE_KINDS = ("trained_tokens", "prompt_tokens", "completion_tokens")


@router.get("/usage")
def usage(
    request: Request,
    viewer: ViewerDep,
    session: SessionDep,
    days: Annotated[int, Query(ge=1, le=366)] = 14,
) -> HTMLResponse:
    """Trained tokens and inference tokens per tenant and day."""
    repo = viewer.repository(session)
    table: dict[tuple[int, str], dict[str, int]] = {}
    for tenant_id, day, kind, quantity in repo.usage_by_day(days, now_ts()):
        row = table.setdefault((day, tenant_id), {})
        row[kind] = row.get(kind, 0) + quantity
    kinds = sorted({k for row in table.values() for k in row} | set(USAGE_KINDS))
    return render(
        request,
        "usage.html",
        viewer=viewer,
        days=days,
        rows=sorted(table.items(), key=lambda item: (-item[0][0], item[0][1])),
        kinds=kinds,
        tenant_names={t.id: t.slug for t in repo.tenants()},
    )


@router.get("/audit")
def audit(
    request: Request,
    viewer: ViewerDep,
    session: SessionDep,
    action: Annotated[str, Query(max_length=100)] = "",
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,  # a BIGINT id
) -> HTMLResponse:
    """Who did what, newest first."""
    repo = viewer.repository(session)
    entries, has_more = repo.audit(action=action or None, before=before)
    return render(
        request,
        "audit.html",
        viewer=viewer,
        entries=entries,
        has_more=has_more,
        action=action,
        tenant_names={t.id: t.slug for t in repo.tenants()},
    )

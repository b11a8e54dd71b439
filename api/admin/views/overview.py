"""The overview: job counts, running jobs, recent failures, workers and vLLM replicas."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse

from api.admin import gateway
from api.admin.auth import AdminDep, ViewerDep
from api.admin.web import admin_router, render
from api.deps import SessionDep
from common.jobs import JobStatus
from models_db.base import now_ts

router = admin_router()


@router.get("")
def overview(
    request: Request, viewer: ViewerDep, session: SessionDep, admin: AdminDep
) -> HTMLResponse:
    """The front page."""
    repo = viewer.repository(session)
    counts = repo.job_counts()
    running, _ = repo.jobs(status=JobStatus.RUNNING, limit=20)
    failed, _ = repo.jobs(status=JobStatus.FAILED, limit=10)
    # Workers and replicas are shared by every tenant: only platform admins see them.
    workers = repo.workers_alive(now_ts()) if viewer.is_platform else []
    fleet = (
        gateway.fetch(admin.settings.gateway_url, admin.server_secret)
        if viewer.is_platform
        else None
    )
    return render(
        request,
        "overview.html",
        viewer=viewer,
        statuses=[s.value for s in JobStatus],
        counts=counts,
        running=running,
        failed=failed,
        failed_deliveries=repo.failed_deliveries(10),
        workers=workers,
        fleet=fleet,
        tenant_names={t.id: t.slug for t in repo.tenants()},
    )

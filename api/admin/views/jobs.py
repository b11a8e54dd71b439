"""Jobs: the filtered list, the detail page with its loss chart, and cancel/pause/resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from sqlalchemy.orm import Session

from api.admin.auth import AdminDep, Viewer, ViewerDep, WriterDep
from api.admin.chart import loss_chart_svg, loss_series
from api.admin.web import SECURITY_HEADERS, admin_router, redirect, render
from api.deps import SessionDep
from api.errors import NotFound
from api.fine_tuning import service as jobs
from api.tenancy.service import Principal
from common.jobs import TERMINAL_STATUSES, JobStatus
from models_db.models import FineTuningJob

router = admin_router()

ACTIONS: dict[str, Callable[[Session, Principal, str], FineTuningJob]] = {
    "cancel": jobs.cancel_job,
    "pause": jobs.pause_job,
    "resume": jobs.resume_job,
}
NOTICES = {
    "cancel": "Cancel requested.",
    "pause": "Pause requested.",
    "resume": "Job resumed: it is queued again.",
}


def _job(session: Session, viewer: Viewer, job_id: str) -> FineTuningJob:
    """The job through the API's own service, in its tenant; another tenant's is a 404."""
    tenant_id = viewer.repository(session).job_tenant(job_id)
    if tenant_id is None:
        raise NotFound(f"Could not find fine-tune: {job_id}")
    return jobs.get_job(session, viewer.principal(tenant_id), job_id)


def status_label(job: FineTuningJob) -> str:
    if job.status == JobStatus.RUNNING and job.cancel_requested_at is not None:
        return "running (cancel requested)"
    if job.status == JobStatus.RUNNING and job.pause_requested_at is not None:
        return "running (pause requested)"
    return str(job.status)


def _live(session: Session, viewer: Viewer, job: FineTuningJob) -> dict[str, Any]:
    series = loss_series(viewer.repository(session).metric_events(job.tenant_id, job.id))
    return {
        "status": job.status,
        "status_label": status_label(job),
        "terminal": job.status in TERMINAL_STATUSES,
        "trained_tokens": job.trained_tokens,
        "train_points": len(series.train),
        "valid_points": len(series.valid),
        "total_steps": series.total_steps,
        "svg": loss_chart_svg(series),
    }


@router.get("/jobs")
def job_list(
    request: Request,
    viewer: ViewerDep,
    session: SessionDep,
    status: str = "",
    tenant: str = "",
    model: str = "",
    before: str = "",
) -> HTMLResponse:
    """Jobs, newest first, filtered by status, tenant and model."""
    repo = viewer.repository(session)
    rows, has_more = repo.jobs(
        status=status or None,
        tenant_id=tenant or None,
        model=model.strip() or None,
        before=before or None,
    )
    return render(
        request,
        "jobs.html",
        viewer=viewer,
        jobs=rows,
        has_more=has_more,
        statuses=[s.value for s in JobStatus],
        tenant_names={t.id: t.slug for t in repo.tenants()},
        filters={"status": status, "tenant": tenant, "model": model},
        status_label=status_label,
    )


@router.get("/jobs/{job_id}")
def job_detail(
    request: Request,
    job_id: str,
    viewer: ViewerDep,
    session: SessionDep,
    admin: AdminDep,
    notice: str = "",
) -> HTMLResponse:
    """One job: status, hyperparameters, loss chart, events, checkpoints, actions."""
    job = _job(session, viewer, job_id)
    repo = viewer.repository(session)
    method_type = job.method.get("type", "supervised")
    return render(
        request,
        "job.html",
        viewer=viewer,
        job=job,
        live=_live(session, viewer, job),
        method_type=method_type,
        hyperparameters=job.method.get(method_type, {}).get("hyperparameters", {}),
        events=repo.events(job.tenant_id, job.id),
        checkpoints=repo.checkpoints(job.tenant_id, job.id),
        tenant=repo.tenant(job.tenant_id),
        poll_seconds=admin.settings.admin_poll_seconds,
        notice=NOTICES.get(notice),
        can_cancel=job.status not in TERMINAL_STATUSES and job.cancel_requested_at is None,
        can_pause=job.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        and job.pause_requested_at is None,
        can_resume=job.status == JobStatus.PAUSED,
    )


@router.get("/jobs/{job_id}/live.json")
def job_live(job_id: str, viewer: ViewerDep, session: SessionDep) -> JSONResponse:
    """Status and loss chart of a job, polled by its page while it runs."""
    job = _job(session, viewer, job_id)
    return JSONResponse(_live(session, viewer, job), headers=SECURITY_HEADERS)


@router.post("/jobs/{job_id}/{action}")
def job_action(
    job_id: str, action: str, viewer: WriterDep, session: SessionDep
) -> RedirectResponse:
    """Cancel, pause or resume a job with the API's own rules (and its audit rows)."""
    apply = ACTIONS.get(action)
    if apply is None:
        raise NotFound(f"Unknown job action {action!r}.")
    tenant_id = viewer.repository(session).job_tenant(job_id)
    if tenant_id is None:
        raise NotFound(f"Could not find fine-tune: {job_id}")
    apply(session, viewer.principal(tenant_id), job_id)
    return redirect(f"/admin/jobs/{job_id}?notice={action}")

"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import FinetunePrincipal, ServicesDep, SessionDep, statement_session
from api.errors import ERROR_RESPONSES, BadRequest
from api.fine_tuning import service
from api.fine_tuning.repository import CheckpointRepository, JobEventRepository, JobRepository
from api.fine_tuning.schemas import (
    CheckpointList,
    CheckpointMetrics,
    CheckpointObject,
    CreateJobRequest,
    FineTuningJobList,
    FineTuningJobObject,
    JobEventList,
    JobEventObject,
)
from api.idempotency import StoredResponse, check_key, fingerprint, replay, run_idempotent
from api.json_body import StrictJSONRoute
from api.tenancy.service import Principal
from models_db.models import FineTuningJob

router = APIRouter(
    prefix="/v1/fine_tuning/jobs",
    tags=["fine-tuning"],
    responses=ERROR_RESPONSES,
    route_class=StrictJSONRoute,
)

_METADATA_PARAM = re.compile(r"^metadata\[(.{1,64})\]$")


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """The ``metadata[KEY]=VALUE`` filters; None for OpenAI's ``metadata=null`` (jobs that have
    no metadata)."""
    # (A filter key given twice never gets here: api/middleware.py refuses repeated names.)
    found: dict[str, str] = {}
    without = False
    for name, value in request.query_params.multi_items():
        match = _METADATA_PARAM.match(name)
        if match and "\x00" not in value and len(value) <= 512:
            found[match.group(1)] = value
        elif name == "metadata" and value == "null":
            without = True
        elif name.startswith("metadata"):
            raise BadRequest(
                "Invalid metadata filter: use metadata[KEY]=VALUE (VALUE up to 512 characters), "
                "or metadata=null for jobs without metadata.",
                param="metadata",
            )
    if without and found:
        raise BadRequest(
            "metadata=null (jobs without metadata) cannot be combined with metadata[KEY] filters.",
            param="metadata",
        )
    return None if without else found


@router.post("", response_model=FineTuningJobObject)
def create_job(
    body: CreateJobRequest,
    services: ServicesDep,
    principal: FinetunePrincipal,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Create a fine-tuning job; it starts in `validating_files` and is queued for a worker."""
    # The hot path (DESIGN §11): the only thread-pool hop is this function (the dependencies
    # are async), and the session is its own, so the whole create holds a connection once.
    idempotency = None
    if idempotency_key is not None:
        check_key(idempotency_key)
        idempotency = service.IdempotentRequest(
            idempotency_key,
            fingerprint("POST", "/v1/fine_tuning/jobs", body.model_dump(mode="json")),
        )
    with statement_session(services) as session:
        result = service.create_job(session, services.settings, principal, body, idempotency)
        session.commit()
    if isinstance(result, StoredResponse):
        assert idempotency is not None
        return replay(result, idempotency.fingerprint)
    return JSONResponse(result)


@router.get("", response_model=FineTuningJobList)
def list_jobs(
    request: Request,
    session: SessionDep,
    principal: FinetunePrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobList:
    """List your organization's jobs, newest first; filter with `metadata[KEY]=VALUE`."""
    rows, has_more = JobRepository(session, principal.tenant_id).list(
        after=after, limit=limit, metadata=_metadata_filter(request)
    )
    return FineTuningJobList(data=[service.to_object(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJobObject)
def retrieve_job(
    job_id: str, session: SessionDep, principal: FinetunePrincipal
) -> FineTuningJobObject:
    """Retrieve one job."""
    return service.to_object(service.get_job(session, principal, job_id))


JobAction = Callable[[Session, Principal, str], FineTuningJob]


def _job_action(
    action: str,
    apply: JobAction,
    session: Session,
    principal: Principal,
    job_id: str,
    idempotency_key: str | None,
) -> JSONResponse:
    """Run a state change on a job once per Idempotency-Key and answer the job object."""

    def produce() -> tuple[int, dict[str, object]]:
        job = apply(session, principal, job_id)
        return 200, service.to_object(job).model_dump(mode="json")

    return run_idempotent(
        session,
        principal.tenant_id,
        idempotency_key,
        fingerprint("POST", f"/v1/fine_tuning/jobs/{job_id}/{action}", None),
        produce,
    )


@router.post("/{job_id}/cancel", response_model=FineTuningJobObject)
def cancel_job(
    job_id: str,
    session: SessionDep,
    principal: FinetunePrincipal,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Cancel a job: at once when queued, within seconds when running."""
    return _job_action("cancel", service.cancel_job, session, principal, job_id, idempotency_key)


@router.post("/{job_id}/pause", response_model=FineTuningJobObject)
def pause_job(
    job_id: str,
    session: SessionDep,
    principal: FinetunePrincipal,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Pause a job: a running one saves a checkpoint and frees its worker."""
    return _job_action("pause", service.pause_job, session, principal, job_id, idempotency_key)


@router.post("/{job_id}/resume", response_model=FineTuningJobObject)
def resume_job(
    job_id: str,
    session: SessionDep,
    principal: FinetunePrincipal,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Resume a paused job from its checkpoint."""
    return _job_action("resume", service.resume_job, session, principal, job_id, idempotency_key)


@router.get("/{job_id}/events", response_model=JobEventList)
def list_events(
    job_id: str,
    session: SessionDep,
    principal: FinetunePrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> JobEventList:
    """The job's events (status messages and metrics), newest first."""
    service.get_job(session, principal, job_id)
    rows, has_more = JobEventRepository(session, principal.tenant_id).list(
        job_id, after=after, limit=limit
    )
    data = [
        JobEventObject(
            id=e.id,
            created_at=e.created_at,
            level=e.level,
            message=e.message,
            type=e.type,
            data=e.data,
        )
        for e in rows
    ]
    return JobEventList(data=data, has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    principal: FinetunePrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    """The job's checkpoints, newest first."""
    job = service.get_job(session, principal, job_id)
    rows, has_more = CheckpointRepository(session, principal.tenant_id).list(
        job_id, after=after, limit=limit
    )
    data = [
        CheckpointObject(
            id=c.id,
            created_at=c.created_at,
            fine_tuned_model_checkpoint=f"ft:{job.base_model_id}:{principal.tenant_slug}"
            f":ckpt-step-{c.step}:{job.id}",
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(**{"step": c.step, **c.metrics}),
            step_number=c.step,
        )
        for c in rows
    ]
    return CheckpointList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )

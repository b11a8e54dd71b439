"""Creating, listing and cancelling fine-tuning jobs.

Creation writes the job, its first event and an outbox row in one transaction; the outbox
dispatcher hands the job id to the training queue after commit (DESIGN §5).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import BadRequest, NotFound
from api.fine_tuning.repository import FileInfo, JobRepository
from api.fine_tuning.schemas import (
    CreateJobRequest,
    DpoHyperparameters,
    FineTuningJobObject,
    JobError,
    JobHyperparameters,
    SupervisedHyperparameters,
)
from api.idempotency import StoredResponse
from api.settings import APISettings
from api.tenancy.service import Principal
from common import ids
from common.ids import show_id
from common.job_endings import job_ended
from common.jobs import (
    DEFAULT_QUEUE,
    RUN_JOB_TASK,
    TERMINAL_STATUSES,
    TRAIN_QUEUE,
    VALIDATE_JOB_TASK,
    JobStatus,
)
from models_db.base import now_ts
from models_db.models import AuditLogEntry, FineTuningJob, JobEvent, OutboxMessage

# Which dataset formats each training method accepts.
_METHOD_FORMATS = {"supervised": {"chat", "alpaca", "sharegpt"}, "dpo": {"dpo"}}


def _resolve_method(request: CreateJobRequest) -> dict[str, Any]:
    """Normalise ``method`` (or the legacy top-level ``hyperparameters``) to OpenAI's shape."""
    method = request.method
    if method is None:
        params = request.hyperparameters or SupervisedHyperparameters()
        return {"type": "supervised", "supervised": {"hyperparameters": params.model_dump()}}
    if request.hyperparameters is not None:
        raise BadRequest(
            "Specify hyperparameters inside 'method', not at the top level, when 'method' is "
            "given.",
            param="hyperparameters",
        )
    if method.type == "supervised":
        if method.dpo is not None:
            raise BadRequest(
                "method.dpo is only allowed when method.type is 'dpo'.", param="method.dpo"
            )
        sft = (
            method.supervised.hyperparameters if method.supervised else SupervisedHyperparameters()
        )
        return {"type": "supervised", "supervised": {"hyperparameters": sft.model_dump()}}
    if method.supervised is not None:
        raise BadRequest(
            "method.supervised is only allowed when method.type is 'supervised'.",
            param="method.supervised",
        )
    dpo = method.dpo.hyperparameters if method.dpo else DpoHyperparameters()
    return {"type": "dpo", "dpo": {"hyperparameters": dpo.model_dump()}}


def _checked_file(found: FileInfo | None, file_id: str, param: str, method_type: str) -> FileInfo:
    # Another tenant's file reads exactly like a missing one.
    if found is None:
        raise BadRequest(
            f"Invalid file ID: {file_id} does not exist.", param=param, code="invalid_file"
        )
    if found.purpose != "fine-tune":
        raise BadRequest(f"File {file_id} does not have purpose 'fine-tune'.", param=param)
    if found.format not in _METHOD_FORMATS[method_type]:
        expected = " or ".join(sorted(_METHOD_FORMATS[method_type]))
        raise BadRequest(
            f"File {file_id} is in {found.format!r} format, but a {method_type} job needs "
            f"{expected} data.",
            param=param,
            code="invalid_file_format",
        )
    return found


@dataclass(frozen=True)
class IdempotentRequest:
    key: str
    fingerprint: str


def create_job(
    session: Session,
    settings: APISettings,
    principal: Principal,
    request: CreateJobRequest,
    idempotency: IdempotentRequest | None = None,
) -> dict[str, Any] | StoredResponse:
    """Create a job and answer its object (OpenAI's JSON shape), or, for an Idempotency-Key
    already used, the response stored with it (which the caller replays or refuses).

    Writes the job, its first event, an outbox row and an audit row (and the key) atomically:
    one statement on Postgres, where ``session`` may be in autocommit mode; elsewhere the
    caller's transaction. The caller commits.
    """
    jobs = JobRepository(session, principal.tenant_id)
    found = jobs.create_inputs(
        model=request.model,
        training_file=request.training_file,
        validation_file=request.validation_file,
        idempotency_key=idempotency.key if idempotency else None,
    )
    if found.stored is not None:
        return found.stored

    method = _resolve_method(request)
    method_type: str = method["type"]
    params: dict[str, Any] = method[method_type]["hyperparameters"]
    # Errors name the field where the client put it (the legacy top level, or inside method).
    where = (
        "hyperparameters." if request.method is None else f"method.{method_type}.hyperparameters."
    )

    if request.model.startswith("ft:"):
        raise BadRequest(
            "Fine-tuning a fine-tuned model is not supported yet; use its base model.",
            param="model",
            code="model_not_available",
        )
    base = found.base_model
    if base is None or not base.enabled:
        raise BadRequest(
            f"Model {request.model} is not available for fine-tuning; GET /v1/models lists "
            "the base models.",
            param="model",
            code="model_not_available",
        )
    if params["quantization"] != "none" and not settings.cuda_workers:
        raise BadRequest(
            f"quantization={params['quantization']!r} needs CUDA training workers, and this "
            "deployment has only CPU workers; use quantization 'none'.",
            param=where + "quantization",
            code="unsupported_on_this_deployment",
        )
    rank = params["lora_rank"]
    if rank != "auto" and rank > settings.max_lora_rank:
        raise BadRequest(
            f"lora_rank {rank} is above what this deployment serves (vLLM's max LoRA rank is "
            f"{settings.max_lora_rank}); the adapter could not be loaded for inference.",
            param=where + "lora_rank",
            code="unsupported_on_this_deployment",
        )
    max_seq_len = params["max_seq_len"]
    if max_seq_len != "auto" and max_seq_len > base.context_length:
        raise BadRequest(
            f"max_seq_len {max_seq_len} exceeds the context length of {base.id} "
            f"({base.context_length}).",
            param=where + "max_seq_len",
        )

    training = _checked_file(
        found.training_file, request.training_file, "training_file", method_type
    )
    validation = (
        _checked_file(
            found.validation_file, request.validation_file, "validation_file", method_type
        )
        if request.validation_file
        else None
    )

    job_id = ids.new_id(ids.JOB)
    now = now_ts()
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    # The object to_object() would render for the row written below (a new job).
    body: dict[str, Any] = {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": now,
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": {
            "batch_size": params["batch_size"],
            "learning_rate_multiplier": params["learning_rate_multiplier"],
            "n_epochs": params["n_epochs"],
        },
        "model": base.id,
        "organization_id": principal.tenant_id,
        "result_files": [],
        "seed": seed,
        "status": JobStatus.VALIDATING_FILES.value,
        "trained_tokens": None,
        "training_file": training.id,
        "validation_file": validation.id if validation else None,
        "integrations": None,
        "estimated_finish": None,
        "metadata": request.metadata,
        "method": method,
        "user_provided_suffix": request.suffix,
    }
    values: dict[str, Any] = {
        "now": now,
        "job_id": job_id,
        "base_model_id": base.id,
        "training_file_id": training.id,
        "validation_file_id": validation.id if validation else None,
        "suffix": request.suffix,
        "seed": seed,
        "job_metadata": request.metadata,
        "method": method,
        "status": JobStatus.VALIDATING_FILES.value,
        "max_attempts": settings.job_max_attempts,
        "event_id": ids.new_id(ids.JOB_EVENT),
        "event_message": f"Created fine-tuning job: {job_id}",
        "outbox_task": VALIDATE_JOB_TASK,
        "outbox_queue": DEFAULT_QUEUE,
        "outbox_args": [job_id],
        "actor": principal.actor,
        "audit_action": "job.create",
        "audit_data": {"model": base.id},
    }
    if idempotency is not None:
        values |= {
            "idempotency_key": idempotency.key,
            "fingerprint": idempotency.fingerprint,
            "status_code": 200,
            "response": body,
        }
    try:
        jobs.insert_created(values, with_key=idempotency is not None)
    except IntegrityError:
        if idempotency is None:
            raise
        # Another request with this key committed first (we waited on its row lock).
        session.rollback()
        winner = jobs.stored_response(idempotency.key)
        if winner is None:  # pragma: no cover - the conflicting row cannot vanish
            raise
        return winner
    # Wake the API's outbox dispatcher after commit (the hook in api.app looks for this flag;
    # it sets it by itself only for ORM-added outbox rows).
    session.info["outbox_dirty"] = True
    return body


def get_job(session: Session, principal: Principal, job_id: str) -> FineTuningJob:
    job = JobRepository(session, principal.tenant_id).get(job_id)
    if job is None:
        raise NotFound(f"Could not find fine-tune: {show_id(job_id)}", param="fine_tuning_job_id")
    return job


def cancel_job(session: Session, principal: Principal, job_id: str) -> FineTuningJob:
    """Cancel at once when no worker holds the job; otherwise flag it for the worker."""
    job = _locked(session, principal, job_id)
    if job.status == JobStatus.CANCELLED:
        return job
    if job.status in TERMINAL_STATUSES:
        raise BadRequest(
            f"Job {job_id} has already {job.status}; it cannot be cancelled.",
            param="fine_tuning_job_id",
            code="job_not_cancellable",
        )
    now = now_ts()
    if job.status == JobStatus.RUNNING:
        if job.cancel_requested_at is None:
            job.cancel_requested_at = now
            message = "Cancellation requested; the worker stops the job within seconds."
        else:
            return job
    else:
        job.status = JobStatus.CANCELLED
        job.finished_at = now
        job.cancel_requested_at = now
        message = "Fine-tuning job cancelled."
    _record(session, principal, job, message, "job.cancel")
    if job.status == JobStatus.CANCELLED:
        job_ended(session, job.id)
    return job


def pause_job(session: Session, principal: Principal, job_id: str) -> FineTuningJob:
    """Pause: a queued job at once; a running one checkpoints and releases its worker."""
    job = _locked(session, principal, job_id)
    if job.status == JobStatus.PAUSED or (
        job.status == JobStatus.RUNNING and job.pause_requested_at is not None
    ):
        return job
    if job.status == JobStatus.QUEUED:
        job.status = JobStatus.PAUSED
        message = "Job paused before it started; resume it to queue it again."
    elif job.status == JobStatus.RUNNING:
        job.pause_requested_at = now_ts()
        message = "Pause requested; the worker saves a checkpoint and releases the job."
    else:
        raise BadRequest(
            f"Job {job_id} is {job.status}; only queued or running jobs can be paused.",
            param="fine_tuning_job_id",
            code="job_not_pausable",
        )
    _record(session, principal, job, message, "job.pause")
    return job


def resume_job(session: Session, principal: Principal, job_id: str) -> FineTuningJob:
    """Resume a paused job: it is queued again and continues from its pause checkpoint."""
    job = _locked(session, principal, job_id)
    if job.status != JobStatus.PAUSED:
        raise BadRequest(
            f"Job {job_id} is {job.status}; only paused jobs can be resumed.",
            param="fine_tuning_job_id",
            code="job_not_paused",
        )
    job.status = JobStatus.QUEUED
    job.pause_requested_at = None
    session.add(
        OutboxMessage(task=RUN_JOB_TASK, queue=TRAIN_QUEUE, args=[job.id], tenant_id=job.tenant_id)
    )
    _record(
        session,
        principal,
        job,
        "Job resumed; queued to continue from its checkpoint.",
        "job.resume",
    )
    return job


def _locked(session: Session, principal: Principal, job_id: str) -> FineTuningJob:
    job = JobRepository(session, principal.tenant_id).get_for_update(job_id)
    if job is None:
        raise NotFound(f"Could not find fine-tune: {show_id(job_id)}", param="fine_tuning_job_id")
    return job


def _record(
    session: Session, principal: Principal, job: FineTuningJob, message: str, action: str
) -> None:
    session.add_all(
        [
            JobEvent(
                id=ids.new_id(ids.JOB_EVENT),
                tenant_id=principal.tenant_id,
                job_id=job.id,
                message=message,
            ),
            AuditLogEntry(
                tenant_id=principal.tenant_id,
                actor=principal.actor,
                action=action,
                target_type="fine_tuning_job",
                target_id=job.id,
                data=None,
            ),
        ]
    )
    session.flush()


def to_object(job: FineTuningJob) -> FineTuningJobObject:
    method_type = job.method["type"]
    params = job.method[method_type]["hyperparameters"]
    return FineTuningJobObject(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=JobHyperparameters(
            batch_size=params["batch_size"],
            learning_rate_multiplier=params["learning_rate_multiplier"],
            n_epochs=params["n_epochs"],
        ),
        model=job.base_model_id,
        organization_id=job.tenant_id,
        result_files=[],
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file_id,
        validation_file=job.validation_file_id,
        estimated_finish=job.estimated_finish,
        metadata=job.job_metadata,
        method=job.method,
        user_provided_suffix=job.suffix,
    )

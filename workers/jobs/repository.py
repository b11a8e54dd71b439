"""Queries of the job execution path, with attempt fencing (DESIGN §5).

A claim increments ``attempt``; every later write by the claiming worker carries
``WHERE attempt = :mine AND status = 'running'``, so a zombie or duplicate worker changes
nothing once another attempt has started or the job has ended.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, delete, func, literal, null, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from common import ids
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
from models_db.models import (
    FineTunedModel,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    OutboxMessage,
    Tenant,
)

# Serializes claims on Postgres so the per-tenant quota check and the claim are one step.
_CLAIM_LOCK_KEY = 0x10AA


CANCELLED_MESSAGE = "Fine-tuning job cancelled; no model was published."


class LostJob(Exception):
    """This worker's attempt no longer owns the job (fenced out, cancelled or finished)."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    tenant_id: str
    attempt: int
    # The status the job keeps while claimed: training (running) or validation.
    stage: JobStatus = JobStatus.RUNNING


@dataclass(frozen=True)
class Flags:
    cancel_requested: bool
    pause_requested: bool


def add_event(
    session: Session,
    job: FineTuningJob | Claim,
    message: str,
    *,
    level: str = "info",
    type_: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    job_id = job.job_id if isinstance(job, Claim) else job.id
    session.add(
        JobEvent(
            id=ids.new_id(ids.JOB_EVENT),
            tenant_id=job.tenant_id,
            job_id=job_id,
            level=level,
            type=type_,
            message=message[:2000],
            data=data,
        )
    )


def enqueue_wakeup(session: Session, tenant_id: str | None, job_id: str) -> None:
    """Ask some training worker to claim work (after this transaction commits)."""
    session.add(
        OutboxMessage(task=RUN_JOB_TASK, queue=TRAIN_QUEUE, args=[job_id], tenant_id=tenant_id)
    )


def claim_next(session: Session, worker_id: str, lease_seconds: int) -> Claim | None:
    """Atomically take the fairest queued job: fewest running jobs, then served longest ago.

    A tenant at its concurrent-job quota is skipped.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_KEY})
    now = now_ts()
    running = aliased(FineTuningJob)
    running_count = (
        select(func.count())
        .select_from(running)
        .where(running.tenant_id == FineTuningJob.tenant_id, running.status == JobStatus.RUNNING)
        .correlate(FineTuningJob)
        .scalar_subquery()
    )
    served = aliased(FineTuningJob)
    last_served = (
        select(func.coalesce(func.max(served.claimed_at_ns), 0))
        .where(served.tenant_id == FineTuningJob.tenant_id)
        .correlate(FineTuningJob)
        .scalar_subquery()
    )
    candidate = session.execute(
        select(FineTuningJob.id, FineTuningJob.tenant_id)
        .join(Tenant, Tenant.id == FineTuningJob.tenant_id)
        .where(FineTuningJob.status == JobStatus.QUEUED, running_count < Tenant.max_concurrent_jobs)
        .order_by(running_count, last_served, FineTuningJob.id)
        .limit(1)
    ).first()
    if candidate is None:
        return None
    attempt = session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == candidate.id, FineTuningJob.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            attempt=FineTuningJob.attempt + 1,
            worker_id=worker_id,
            lease_until=now + lease_seconds,
            claimed_at_ns=time.time_ns(),
            started_at=func.coalesce(FineTuningJob.started_at, now),
        )
        .returning(FineTuningJob.attempt)
    ).scalar_one_or_none()
    if attempt is None:
        return None
    return Claim(candidate.id, candidate.tenant_id, attempt)


def claim_validation(
    session: Session, job_id: str, worker_id: str, lease_seconds: int
) -> Claim | None:
    """Take the validation of a job in `validating_files` that no worker holds a live lease
    on; None when another worker is validating it or it has moved on."""
    now = now_ts()
    row = session.execute(
        update(FineTuningJob)
        .where(
            FineTuningJob.id == job_id,
            FineTuningJob.status == JobStatus.VALIDATING_FILES,
            or_(
                FineTuningJob.worker_id.is_(None),
                FineTuningJob.lease_until.is_(None),
                FineTuningJob.lease_until < now,
            ),
        )
        .values(
            attempt=FineTuningJob.attempt + 1,
            worker_id=worker_id,
            lease_until=now + lease_seconds,
        )
        .returning(FineTuningJob.attempt, FineTuningJob.tenant_id)
    ).first()
    if row is None:
        return None
    return Claim(job_id, row.tenant_id, row.attempt, JobStatus.VALIDATING_FILES)


def _fenced(claim: Claim) -> Any:
    return and_(
        FineTuningJob.id == claim.job_id,
        FineTuningJob.attempt == claim.attempt,
        FineTuningJob.status == claim.stage,
    )


def touch(session: Session, claim: Claim, lease_seconds: int) -> Flags:
    """Extend the lease and read the cancel/pause flags; raises LostJob when fenced out."""
    row = session.execute(
        update(FineTuningJob)
        .where(_fenced(claim))
        .values(lease_until=now_ts() + lease_seconds)
        .returning(FineTuningJob.cancel_requested_at, FineTuningJob.pause_requested_at)
    ).first()
    if row is None:
        raise LostJob(claim.job_id)
    return Flags(row.cancel_requested_at is not None, row.pause_requested_at is not None)


def finish(session: Session, claim: Claim, status: JobStatus, **values: Any) -> JobStatus:
    """Move a claimed job out of `running` (fenced); returns the status written.

    A cancel the API acknowledged wins over pausing, retrying or failing: the job ends
    `cancelled` (decided in the statement itself, so a cancel committed just before counts).
    Success is not overridden here: the publish checks the flag before it creates anything.
    """
    now = now_ts()
    extra: dict[str, Any] = {"worker_id": None, "lease_until": None}
    if status == JobStatus.PAUSED:
        extra["pause_requested_at"] = None
    if status in (JobStatus.PAUSED, JobStatus.QUEUED, JobStatus.FAILED):
        cancelled = FineTuningJob.cancel_requested_at.is_not(None)
        extra["status"] = case((cancelled, JobStatus.CANCELLED.value), else_=status.value)
        extra["finished_at"] = (
            now if status == JobStatus.FAILED else case((cancelled, now), else_=null())
        )
        if "error" in values:
            error = values.pop("error")
            extra["error"] = case(
                (cancelled, null()), else_=literal(error, FineTuningJob.error.type)
            )
    else:
        extra["status"] = status
        if status in TERMINAL_STATUSES:
            extra["finished_at"] = now
    written = session.execute(
        update(FineTuningJob)
        .where(_fenced(claim))
        .values(**extra, **values)
        .returning(FineTuningJob.status)
    ).scalar_one_or_none()
    if written is None:
        raise LostJob(claim.job_id)
    result = JobStatus(written)
    if result in TERMINAL_STATUSES:
        job_ended(session, claim.job_id)
    return result


def checkpoints_newest_first(session: Session, job_id: str) -> Sequence[JobCheckpoint]:
    """The job's recorded checkpoints, the latest step first: where a resume starts, then
    where it falls back to."""
    return session.scalars(
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(JobCheckpoint.step.desc())
    ).all()


def delete_checkpoints(session: Session, claim: Claim, checkpoint_ids: Sequence[str]) -> None:
    """Delete rows of the claimed job's checkpoints (never another job's, whatever the ids).

    The caller deletes the objects only after this commits: an object nothing points at is
    harmless, a row pointing at deleted objects is not.
    """
    if checkpoint_ids:
        session.execute(
            delete(JobCheckpoint).where(
                JobCheckpoint.job_id == claim.job_id, JobCheckpoint.id.in_(checkpoint_ids)
            )
        )


def drop_old_checkpoints(session: Session, claim: Claim, keep: int) -> list[str]:
    """Delete the rows of the claimed job's checkpoints beyond the newest ``keep``; returns
    their storage prefixes, for the caller to delete once this transaction has committed."""
    old = session.execute(
        select(JobCheckpoint.id, JobCheckpoint.storage_prefix)
        .where(JobCheckpoint.job_id == claim.job_id)
        .order_by(JobCheckpoint.step.desc())
        .offset(keep)
    ).all()
    delete_checkpoints(session, claim, [row.id for row in old])
    return [row.storage_prefix for row in old]


def checkpoint_prefixes(session: Session, job_id: str) -> set[str]:
    """The storage prefixes that the job's checkpoint rows point at."""
    return set(
        session.scalars(select(JobCheckpoint.storage_prefix).where(JobCheckpoint.job_id == job_id))
    )


def adapter_prefixes(session: Session, job_id: str) -> set[str]:
    """The storage prefix of the job's published adapter, if it has one (kept when retired)."""
    return set(
        session.scalars(
            select(FineTunedModel.storage_prefix).where(FineTunedModel.job_id == job_id)
        )
    )


def tenant_of(session: Session, job_id: str) -> str | None:
    tenant_id: str | None = session.scalar(
        select(FineTuningJob.tenant_id).where(FineTuningJob.id == job_id)
    )
    return tenant_id


def job_status(session: Session, job_id: str) -> JobStatus | None:
    status = session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))
    return None if status is None else JobStatus(status)


def expired_jobs(session: Session, now: int, limit: int = 100) -> Sequence[FineTuningJob]:
    stmt = (
        select(FineTuningJob)
        .where(FineTuningJob.status == JobStatus.RUNNING, FineTuningJob.lease_until < now)
        .limit(limit)
        # Postgres: the rows another reaper holds are skipped. SQLite: the database's write
        # lock is taken before the read (models_db.session), so the rows can't change under us.
        .with_for_update(skip_locked=True)
    )
    return session.scalars(stmt).all()


def stalled_validations(
    session: Session, now: int, resend_after: int, limit: int = 100
) -> Sequence[FineTuningJob]:
    """Jobs in `validating_files` that no worker is validating: a lease (or a retry's wait)
    that ran out, or a job left without one since its creation (its message lost)."""
    stmt = (
        select(FineTuningJob)
        .where(
            FineTuningJob.status == JobStatus.VALIDATING_FILES,
            or_(
                FineTuningJob.lease_until < now,
                and_(
                    FineTuningJob.lease_until.is_(None),
                    FineTuningJob.created_at < now - resend_after,
                ),
            ),
        )
        .limit(limit)
        # Postgres: the rows another reaper holds are skipped. SQLite: the database's write
        # lock is taken before the read (models_db.session), so the rows can't change under us.
        .with_for_update(skip_locked=True)
    )
    return session.scalars(stmt).all()


def enqueue_validation(session: Session, tenant_id: str, job_id: str) -> None:
    """Ask some worker to validate the job's files (after this transaction commits)."""
    session.add(
        OutboxMessage(
            task=VALIDATE_JOB_TASK, queue=DEFAULT_QUEUE, args=[job_id], tenant_id=tenant_id
        )
    )


def has_claimable_jobs(session: Session) -> bool:
    return (
        session.scalar(
            select(FineTuningJob.id).where(FineTuningJob.status == JobStatus.QUEUED).limit(1)
        )
        is not None
    )

"""The periodic reaper: re-queues jobs whose worker stopped heartbeating (DESIGN §5), and sends
validations that no worker is doing again."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.job_endings import job_ended
from common.jobs import RUN_JOB_TASK, JobStatus
from models_db.base import now_ts
from models_db.models import FineTuningJob, OutboxMessage
from workers.jobs.repository import (
    add_event,
    enqueue_validation,
    enqueue_wakeup,
    expired_jobs,
    has_claimable_jobs,
    stalled_validations,
)
from workers.jobs.validation import INTERNAL_ERROR_MESSAGE

log = logging.getLogger(__name__)


def reap(
    session: Session,
    *,
    validation_resend_seconds: int,
    kick_after_seconds: int = 10,
) -> int:
    """Re-queue jobs with an expired lease, counting a failed attempt (or cancel, fail after
    max_attempts failures, or pause, when the tenant asked for it), and re-send stalled
    validations (``validation_resend_seconds``: the worker's setting of that name); returns
    how many jobs it handled."""
    now = now_ts()
    handled = _redrive_validations(session, now, validation_resend_seconds)
    for job in expired_jobs(session, now):
        # Which worker is for the operators; the tenant's events say "the job's worker".
        log.warning("job %s: worker %s stopped responding", job.id, job.worker_id or "unknown")
        if job.cancel_requested_at is not None:
            # A cancel the API acknowledged is what the tenant gets, whatever else is due.
            job.status = JobStatus.CANCELLED
            job.finished_at = now
            add_event(
                session,
                job,
                "The job's worker stopped responding; the job is cancelled as requested; no "
                "model was published.",
            )
            job_ended(session, job.id)
        else:
            _count_lost_attempt(session, job, now)
        job.worker_id = None
        job.lease_until = None
        handled += 1
    if handled == 0 and has_claimable_jobs(session):
        # Jobs can wait for capacity (a tenant quota, busy workers) after their wake-up
        # message was consumed; make sure some worker looks again.
        last = session.scalar(
            select(func.max(OutboxMessage.created_at)).where(OutboxMessage.task == RUN_JOB_TASK)
        )
        if last is None or now - last >= kick_after_seconds:
            enqueue_wakeup(session, None, "")
    if handled:
        log.info("reaper handled %d job(s)", handled)
    return handled


def _redrive_validations(session: Session, now: int, resend_after: int) -> int:
    """Send the validation of every stalled job again. A lease that ran out while a worker
    held it counts as a failed try (the job fails at max_attempts); a retry that waited, or a
    message that may be lost, does not. The job then waits ``resend_after`` for a worker
    before the next message."""
    handled = 0
    for job in stalled_validations(session, now, resend_after):
        handled += 1
        if job.worker_id is not None:
            job.failed_attempts += 1
            if job.failed_attempts >= job.max_attempts:
                message = INTERNAL_ERROR_MESSAGE.format(n=job.failed_attempts)
                job.status = JobStatus.FAILED
                job.finished_at = now
                job.worker_id = job.lease_until = None
                job.error = {"code": "validation_error", "message": message, "param": None}
                add_event(session, job, f"Validation failed: {message}", level="error")
                job_ended(session, job.id)
                continue
            add_event(
                session,
                job,
                f"The worker validating the files stopped responding ({job.failed_attempts} of "
                f"{job.max_attempts} allowed failures); validating them again.",
                level="warn",
            )
        job.worker_id = None
        job.lease_until = now + resend_after
        enqueue_validation(session, job.tenant_id, job.id)
    return handled


def _count_lost_attempt(session: Session, job: FineTuningJob, now: int) -> None:
    """A lost attempt counts as a failed one: fail the job at the limit, else pause it (when
    a pause is pending) or queue it again to resume from its last checkpoint."""
    job.failed_attempts += 1
    counted = f"({job.failed_attempts} of {job.max_attempts} allowed failures)"
    if job.failed_attempts >= job.max_attempts:
        job.status = JobStatus.FAILED
        job.finished_at = now
        job.error = {
            "code": "worker_lost",
            "message": f"The worker running this job stopped responding; {job.failed_attempts} "
            "attempts have failed, the most allowed. Giving up.",
            "param": None,
        }
        add_event(
            session,
            job,
            "The job's worker stopped responding; job failed.",
            level="error",
        )
        job_ended(session, job.id)
    elif job.pause_requested_at is not None:
        # The tenant asked for a pause: honour it instead of starting the job again.
        job.status = JobStatus.PAUSED
        job.pause_requested_at = None
        add_event(
            session,
            job,
            f"The job's worker stopped responding {counted}; the job is paused as requested. "
            "Resume it to continue from its last checkpoint.",
            level="warn",
        )
    else:
        job.status = JobStatus.QUEUED
        add_event(
            session,
            job,
            f"The job's worker stopped responding {counted}; job re-queued to resume from its "
            "last checkpoint.",
            level="warn",
        )
        enqueue_wakeup(session, job.tenant_id, job.id)

"""What follows a job's end, written in the transaction that ends it (DESIGN §5: the outbox makes
it survive a crash between commit and publish).

A job ends in many places: its worker finishing, the reaper giving up on a worker, validation
refusing the files, the API cancelling a queued or paused job. Each of them calls
``job_ended``, so none can forget a consequence: the tenant's webhook event, and a task that
deletes the checkpoint folders no row points at (uploads of attempts that died or were fenced
out), which otherwise only a worker finishing the job itself would sweep.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from common.jobs import DEFAULT_QUEUE, SWEEP_JOB_TASK
from common.webhooks.events import emit_job_finished
from models_db.models import FineTuningJob, OutboxMessage


def job_ended(session: Session, job_id: str) -> None:
    """After the job reached succeeded, failed or cancelled in this transaction."""
    emit_job_finished(session, job_id)
    job = session.get(FineTuningJob, job_id)
    if job is not None:
        session.add(
            OutboxMessage(
                task=SWEEP_JOB_TASK, queue=DEFAULT_QUEUE, args=[job_id], tenant_id=job.tenant_id
            )
        )

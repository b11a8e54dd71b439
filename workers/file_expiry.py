"""Files uploaded with ``expires_after``: once past ``expires_at`` the API no longer shows them
(api/files/repository.py); this sweep, run by every worker's reaper, deletes their bytes and
marks them deleted, which also frees the tenant's storage quota.

A file that an unfinished job (validating, queued, running or paused) still uses is kept until
that job ends: expiry must not fail a job that was accepted while the file was there.
"""

from __future__ import annotations

import logging

from sqlalchemy import or_, select

from common.jobs import TERMINAL_STATUSES
from models_db.base import now_ts
from models_db.models import AuditLogEntry, File, FineTuningJob
from models_db.session import transaction
from workers.context import WorkerContext

log = logging.getLogger(__name__)


GRACE_SECONDS = 600
"""The bytes stay this long past ``expires_at``: a job created in the last moments before it (its
lookup and its insert are two statements), or by an API host whose clock runs behind, is then
visible to the sweep before the bytes go."""


def expire_files(ctx: WorkerContext, *, limit: int = 100, grace: int = GRACE_SECONDS) -> int:
    """Delete up to ``limit`` expired files no unfinished job uses; returns how many."""
    now = now_ts()
    unfinished = select(FineTuningJob.id).where(
        FineTuningJob.status.not_in([s.value for s in TERMINAL_STATUSES]),
        or_(
            FineTuningJob.training_file_id == File.id,
            FineTuningJob.validation_file_id == File.id,
        ),
    )
    with transaction(ctx.session_factory) as session:
        due = session.execute(
            select(File.id, File.storage_key)
            .where(File.deleted_at.is_(None), File.expires_at <= now - grace)
            .where(~unfinished.exists())
            .order_by(File.expires_at)
            .limit(limit)
        ).all()
    expired = 0
    for file_id, key in due:
        # Bytes first, then the row: a crash in between leaves a row that the next sweep
        # finishes, never bytes that no row points at.
        try:
            ctx.storage.delete(key)
        except Exception:
            log.warning("could not delete the bytes of expired file %s", file_id, exc_info=True)
            continue
        with transaction(ctx.session_factory) as session:
            row = session.get(File, file_id, with_for_update=True)
            if row is None or row.deleted_at is not None:
                continue
            row.deleted_at = now
            session.add(
                AuditLogEntry(
                    tenant_id=row.tenant_id,
                    actor="system",
                    action="file.expire",
                    target_type="file",
                    target_id=file_id,
                    data={"expires_at": row.expires_at},
                )
            )
        expired += 1
    if expired:
        log.info("deleted %d expired file(s)", expired)
    return expired

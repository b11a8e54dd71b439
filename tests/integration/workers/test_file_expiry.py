"""Files uploaded with expires_after: the sweep deletes their bytes once they have expired,
but not while an unfinished job still uses them (Postgres and SQLite)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from models_db.base import now_ts
from models_db.models import AuditLogEntry, File, FineTuningJob
from models_db.session import transaction
from workers.file_expiry import GRACE_SECONDS, expire_files


def _expire(jobs: Any, file_id: str) -> str:
    with transaction(jobs.session_factory) as session:
        row = session.get(File, file_id)
        assert row is not None
        row.expires_at = now_ts() - GRACE_SECONDS - 1  # expired, and past the grace period
        return row.storage_key


@pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)
def test_expired_files_lose_their_bytes_once_no_unfinished_job_uses_them(make_jobs: Any) -> None:
    jobs = make_jobs()
    in_use = jobs.file_id
    job_id = jobs.create()  # validating_files: it still needs the file
    unused = jobs.upload(12)
    kept = jobs.upload(12)  # no expiry: never touched
    keys = {f: _expire(jobs, f) for f in (in_use, unused)}
    recent = jobs.upload(12)
    with transaction(jobs.session_factory) as session:
        session.get(File, recent).expires_at = now_ts() - 1  # type: ignore[union-attr]

    assert expire_files(jobs.ctx) == 1
    assert not jobs.ctx.storage.exists(keys[unused])
    assert jobs.ctx.storage.exists(keys[in_use])
    with transaction(jobs.session_factory) as session:
        assert session.get(File, unused).deleted_at is not None  # type: ignore[union-attr]
        assert session.get(File, in_use).deleted_at is None  # type: ignore[union-attr]
        assert session.get(File, kept).deleted_at is None  # type: ignore[union-attr]
        assert session.get(File, recent).deleted_at is None  # type: ignore[union-attr]  # grace
        audit = session.scalars(
            select(AuditLogEntry).where(AuditLogEntry.action == "file.expire")
        ).all()
        assert [(a.target_id, a.actor) for a in audit] == [(unused, "system")]
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        job.status = "cancelled"  # the job has ended: its file can go now

    assert expire_files(jobs.ctx) == 1
    assert not jobs.ctx.storage.exists(keys[in_use])
    assert expire_files(jobs.ctx) == 0

"""Queries for fine-tuning jobs, their events and checkpoints, within the caller's tenant."""

from __future__ import annotations

from collections.abc import Sequence

from api.pagination import check_cursor, page
from api.scoping import TenantScopedRepository
from models_db.models import FineTuningJob, JobCheckpoint, JobEvent


class JobRepository(TenantScopedRepository[FineTuningJob]):
    model = FineTuningJob

    def list(
        self, *, after: str | None, limit: int, metadata: dict[str, str]
    ) -> tuple[Sequence[FineTuningJob], bool]:
        stmt = self.select()
        for key, value in metadata.items():
            stmt = stmt.where(FineTuningJob.job_metadata[key].as_string() == value)
        return page(self.session, stmt, FineTuningJob.id, after, limit)

    def get_for_update(self, job_id: str) -> FineTuningJob | None:
        # Row lock: cancel must not race the worker's claim (a no-op on SQLite, which
        # serializes writers anyway).
        stmt = self.select().where(FineTuningJob.id == job_id).with_for_update()
        return self.session.scalars(stmt).first()


class JobEventRepository(TenantScopedRepository[JobEvent]):
    model = JobEvent

    def list(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[Sequence[JobEvent], bool]:
        stmt = self.select().where(JobEvent.job_id == job_id)
        check_cursor(after)
        if after:
            cursor = self.session.scalar(
                self.select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job_id)
            )
            if cursor is None:
                return [], False
            stmt = stmt.where(JobEvent.seq < cursor)
        rows = self.session.scalars(stmt.order_by(JobEvent.seq.desc()).limit(limit + 1)).all()
        return rows[:limit], len(rows) > limit


class CheckpointRepository(TenantScopedRepository[JobCheckpoint]):
    model = JobCheckpoint

    def list(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[Sequence[JobCheckpoint], bool]:
        stmt = self.select().where(JobCheckpoint.job_id == job_id)
        return page(self.session, stmt, JobCheckpoint.id, after, limit)

"""Queries for files, always within the caller's tenant."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func

from api.pagination import check_cursor, page
from api.scoping import TenantScopedRepository
from common import ids
from models_db.models import File


class FileRepository(TenantScopedRepository[File]):
    model = File

    def get_live(self, file_id: str) -> File | None:
        row = self.get(file_id)
        return row if row is not None and row.deleted_at is None else None

    def list(
        self, *, purpose: str | None, after: str | None, limit: int, ascending: bool
    ) -> tuple[Sequence[File], bool]:
        stmt = self.select().where(File.deleted_at.is_(None))
        if purpose:
            stmt = stmt.where(File.purpose == purpose)
        if ascending:
            check_cursor(after)
            if after:
                stmt = stmt.where(File.id > after)
            rows = self.session.scalars(stmt.order_by(File.id.asc()).limit(limit + 1)).all()
            return rows[:limit], len(rows) > limit
        return page(self.session, stmt, File.id, after, limit, prefix=ids.FILE)

    def stored_bytes(self) -> int:
        total = self.session.scalar(
            self.select(func.coalesce(func.sum(File.bytes), 0)).where(File.deleted_at.is_(None))
        )
        return int(total or 0)

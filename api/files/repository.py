"""Queries for files, always within the caller's tenant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, or_

from api.pagination import check_cursor, page
from api.scoping import TenantScopedRepository
from common import ids
from models_db.base import now_ts
from models_db.models import File


def live_file(columns: Any, now: Any) -> Any:
    """The condition for a file the API still shows: not deleted, not past its expiry.
    ``columns`` is the File entity or a table alias's ``.c``."""
    return and_(
        columns.deleted_at.is_(None), or_(columns.expires_at.is_(None), columns.expires_at > now)
    )


class FileRepository(TenantScopedRepository[File]):
    model = File

    def get_live(self, file_id: str) -> File | None:
        row: File | None = self.session.scalar(
            self.select().where(File.id == file_id, live_file(File, now_ts()))
        )
        return row

    def list(
        self, *, purpose: str | None, after: str | None, limit: int, ascending: bool
    ) -> tuple[Sequence[File], bool]:
        stmt = self.select().where(live_file(File, now_ts()))
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

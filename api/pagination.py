"""Cursor pagination as OpenAI does it: ``after`` (an id), ``limit``, ``has_more``.

Ids sort by creation time (common.ids), so "older than the cursor" is ``id < after``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from api.errors import BadRequest
from common.ids import is_plausible_id


def page(
    session: Session, stmt: Select[Any], id_column: Any, after: str | None, limit: int
) -> tuple[Sequence[Any], bool]:
    """Newest first; returns (rows, has_more)."""
    check_cursor(after)
    if after:
        stmt = stmt.where(id_column < after)
    rows = session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def check_cursor(after: str | None) -> None:
    if after is not None and not is_plausible_id(after):
        raise BadRequest(
            "Invalid 'after' cursor: pass the id of the last object you received.", param="after"
        )

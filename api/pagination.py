"""Cursor pagination as OpenAI does it: ``after`` (an id), ``limit``, ``has_more``.

Ids sort by creation time (common.ids), so "older than the cursor" is ``id < after``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session

from api.errors import BadRequest
from common.ids import is_id_of, is_plausible_id


def page(
    session: Session,
    stmt: Select[Any],
    id_column: Any,
    after: str | None,
    limit: int,
    *,
    prefix: str | None = None,
) -> tuple[Sequence[Any], bool]:
    """Newest first; returns (rows, has_more). ``after`` must be an id of ``prefix``'s kind
    where one is given (it need not exist any more: the client may have deleted it)."""
    check_cursor(after, prefix)
    if after:
        stmt = stmt.where(id_column < after)
    rows = session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def check_cursor(after: str | None, prefix: str | None = None) -> None:
    if after is None:
        return
    if not is_plausible_id(after) or (prefix is not None and not is_id_of(prefix, after)):
        raise BadRequest(
            "Invalid 'after' cursor: pass the id of the last object you received"
            + (f" (an id starting with '{prefix}')." if prefix else "."),
            param="after",
        )

"""``Idempotency-Key`` on POST requests: a retry gets the first response, never a second effect.

The key row is written in the same transaction as the work, and a retry replays the response
stored in it. :func:`run_idempotent` inserts (and flushes) the row *before* the work; job
creation writes it in the same statement as the job (api.fine_tuning). Either way a concurrent
request with the same key blocks on that row's unique index until the first transaction ends,
then fails to insert and replays the stored response; a transaction that rolls back leaves no
key behind, so the retry does the work. No "in progress" state is ever visible to another
request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy import Insert, Select, Table, and_, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import BadRequest
from models_db.models import IdempotencyKey

MAX_KEY_LENGTH = 255

_KEYS: Table = IdempotencyKey.__table__  # type: ignore[assignment]


def fingerprint(method: str, path: str, payload: Any) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{body}".encode()).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters.",
            param="Idempotency-Key",
        )


@dataclass(frozen=True)
class StoredResponse:
    """What a key's first request answered (and the fingerprint of that request)."""

    fingerprint: str
    status_code: int
    response: dict[str, Any]


def replay(stored: StoredResponse, expected: str) -> JSONResponse:
    if stored.fingerprint != expected:
        raise BadRequest(
            "This Idempotency-Key was already used with a different request; use a new key.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return JSONResponse(
        stored.response, status_code=stored.status_code, headers={"Idempotent-Replayed": "true"}
    )


def _replay(row: IdempotencyKey, expected: str) -> JSONResponse:
    return replay(StoredResponse(row.fingerprint, row.status_code, row.response), expected)


# Core statements for writers that put the key row in their own statement. Parameters:
# tenant_id, idempotency_key, and (insert only) now, fingerprint, status_code, response.
STORED_COLUMNS = (_KEYS.c.fingerprint, _KEYS.c.status_code, _KEYS.c.response)


def key_matches() -> Any:
    """The join condition on the key row of (:tenant_id, :idempotency_key)."""
    return and_(
        _KEYS.c.tenant_id == bindparam("tenant_id"), _KEYS.c.key == bindparam("idempotency_key")
    )


def stored_select() -> Select[Any]:
    return select(*STORED_COLUMNS).where(key_matches())


def key_insert() -> Insert:
    return insert(_KEYS).values(
        tenant_id=bindparam("tenant_id"),
        key=bindparam("idempotency_key"),
        created_at=bindparam("now"),
        fingerprint=bindparam("fingerprint"),
        status_code=bindparam("status_code"),
        response=bindparam("response"),
    )


def run_idempotent(
    session: Session,
    tenant_id: str,
    key: str | None,
    request_fingerprint: str,
    produce: Callable[[], tuple[int, dict[str, Any]]],
) -> JSONResponse:
    """Run ``produce`` once per (tenant, key); later calls replay its response."""
    if key is None:
        status, body = produce()
        return JSONResponse(body, status_code=status)
    check_key(key)
    existing = session.get(IdempotencyKey, (tenant_id, key))
    if existing is not None:
        return _replay(existing, request_fingerprint)
    row = IdempotencyKey(
        tenant_id=tenant_id, key=key, fingerprint=request_fingerprint, status_code=0, response={}
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        # Another request with this key committed first (we waited on its row lock).
        session.rollback()
        winner = session.get(IdempotencyKey, (tenant_id, key), populate_existing=True)
        if winner is None:  # pragma: no cover - the conflicting row cannot vanish
            raise
        return _replay(winner, request_fingerprint)
    status, body = produce()
    row.status_code = status
    row.response = body
    session.flush()
    return JSONResponse(body, status_code=status)

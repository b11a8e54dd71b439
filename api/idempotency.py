"""``Idempotency-Key`` on POST requests: a retry gets the first response, never a second effect.

The key row is inserted (and flushed) *before* the work, in the request's transaction. A
concurrent request with the same key blocks on that row's unique index until the first
transaction ends, then fails to insert and replays the stored response; a transaction that
rolls back leaves no key behind, so the retry does the work. No "in progress" state is ever
visible to another request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import BadRequest
from models_db.models import IdempotencyKey

MAX_KEY_LENGTH = 255


def fingerprint(method: str, path: str, payload: Any) -> str:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{body}".encode()).hexdigest()


def _replay(row: IdempotencyKey, expected: str) -> JSONResponse:
    if row.fingerprint != expected:
        raise BadRequest(
            "This Idempotency-Key was already used with a different request; use a new key.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return JSONResponse(
        row.response, status_code=row.status_code, headers={"Idempotent-Replayed": "true"}
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
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters.",
            param="Idempotency-Key",
        )
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

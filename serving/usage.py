"""Token usage per tenant and model, summed in memory and written in batches.

The hot path only adds to a dict; a background task writes one ``usage_records`` row per
(tenant, model, kind) every few seconds. A crash loses at most that interval of counts, which
is the price of never writing to the database per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter

from anyio import to_thread
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from models_db.base import now_ts
from models_db.models import UsageRecord

log = logging.getLogger(__name__)


class UsageMeter:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._pending: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, tenant_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            if prompt_tokens:
                self._pending[(tenant_id, model, "prompt_tokens")] += prompt_tokens
            if completion_tokens:
                self._pending[(tenant_id, model, "completion_tokens")] += completion_tokens

    def flush(self) -> int:
        """Write what has accumulated; returns the rows written. Blocking."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return 0
        now = now_ts()
        rows = [
            {
                "tenant_id": tenant,
                "model": model,
                "kind": kind,
                "quantity": quantity,
                "created_at": now,
            }
            for (tenant, model, kind), quantity in pending.items()
        ]
        try:
            with self._session_factory() as session, session.begin():
                session.execute(insert(UsageRecord), rows)
        except Exception:
            with self._lock:
                self._pending.update(pending)  # keep the counts for the next try
            raise
        return len(rows)

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await to_thread.run_sync(self.flush)
            except Exception:
                log.exception("writing usage records failed")

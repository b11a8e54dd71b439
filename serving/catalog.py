"""What a ``model`` name means for a tenant, and the tenant's limits, remembered briefly.

Lookups are blocking database reads, made in a thread on a cache miss only; a hit costs a dict
lookup. Answers (including "no such model") are kept for ``ttl`` seconds, so a model deleted
through the API answers 404 within that time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.catalog.repository import BaseModelRepository, FineTunedModelRepository
from models_db.models import FineTunedModel, Tenant
from serving.adapters import AdapterRef
from serving.ratelimit import Limits

T = TypeVar("T")


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the caller asked for, and what vLLM serves it as
    base_model: str
    context_length: int
    adapter: AdapterRef | None


class Remembered(Generic[T]):
    """A small TTL map that also remembers negative answers."""

    def __init__(self, ttl: float, max_entries: int = 50_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[Hashable, tuple[float, T | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, key: Hashable) -> tuple[bool, T | None]:
        """(found, value): a remembered None means "known not to exist"."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, key: Hashable, value: T | None) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (time.monotonic() + self._ttl, value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class ModelCatalog:
    def __init__(
        self, session_factory: sessionmaker[Session], ttl: float, limits_ttl: float = 5.0
    ) -> None:
        self._session_factory = session_factory
        self.models: Remembered[ResolvedModel] = Remembered(ttl)
        self.limits: Remembered[Limits] = Remembered(limits_ttl)

    def resolve(self, tenant_id: str, name: str) -> ResolvedModel | None:
        """Blocking. A live fine-tuned model of this tenant, or an enabled base model."""
        with self._session_factory() as session:
            tuned = FineTunedModelRepository(session, tenant_id).get_live(name)
            if tuned is not None:
                base = BaseModelRepository(session).get_enabled(tuned.base_model_id)
                if base is None:
                    return None
                return ResolvedModel(
                    name=tuned.id,
                    base_model=base.id,
                    context_length=base.context_length,
                    adapter=AdapterRef(
                        name=tuned.id,
                        base_model=base.id,
                        storage_prefix=tuned.storage_prefix,
                        manifest_sha256=tuned.manifest_sha256,
                    ),
                )
            base = BaseModelRepository(session).get_enabled(name)
            if base is None:
                return None
            return ResolvedModel(
                name=base.id, base_model=base.id, context_length=base.context_length, adapter=None
            )

    def tenant_limits(self, tenant_id: str) -> Limits:
        """Blocking. The tenant's rate limits (its quota columns)."""
        with self._session_factory() as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                return Limits(0, 0)
            return Limits(tenant.max_requests_per_minute, tenant.max_tokens_per_minute)

    def retired_since(self, since: int) -> list[tuple[str, int]]:
        """Blocking. Fine-tuned models retired at or after ``since`` (epoch seconds)."""
        with self._session_factory() as session:
            rows = session.execute(
                select(FineTunedModel.id, FineTunedModel.retired_at).where(
                    FineTunedModel.retired_at >= since
                )
            ).all()
        return [(name, int(at)) for name, at in rows if at is not None]

"""What a ``model`` name means for a tenant, and the tenant's limits: blocking database reads,
which the gateway makes through its refreshing caches (serving/cache.py), never per request."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.catalog.repository import BaseModelRepository, FineTunedModelRepository
from models_db.models import ApiKey, BaseModel, FineTunedModel, Tenant
from serving.adapters import AdapterRef
from serving.ratelimit import Limits


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the caller asked for, and what vLLM serves it as
    base_model: str
    context_length: int
    adapter: AdapterRef | None


class ModelCatalog:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

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

    def retired_since(self, since: int) -> list[tuple[str, str]]:
        """Blocking. (model, tenant) of fine-tuned models retired at or after ``since``."""
        with self._session_factory() as session:
            rows = session.execute(
                select(FineTunedModel.id, FineTunedModel.tenant_id).where(
                    FineTunedModel.retired_at >= since
                )
            ).all()
        return [(name, tenant) for name, tenant in rows]

    def revoked_keys_since(self, since: int) -> list[str]:
        """Blocking. Hashes of the API keys revoked, or whose tenant was disabled, at or after
        ``since``."""
        revoked = select(ApiKey.key_hash).where(ApiKey.revoked_at >= since)
        disabled = (
            select(ApiKey.key_hash)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(Tenant.disabled_at >= since)
        )
        with self._session_factory() as session:
            return list(session.scalars(revoked.union(disabled)))

    def base_models(self) -> dict[str, tuple[bool, int]]:
        """Blocking. Every registered base model: (enabled, context length). A small table."""
        with self._session_factory() as session:
            rows = session.execute(
                select(BaseModel.id, BaseModel.enabled, BaseModel.context_length)
            ).all()
        return {name: (bool(enabled), int(length)) for name, enabled, length in rows}

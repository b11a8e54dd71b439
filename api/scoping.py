"""The one place where tenant scoping is applied to queries.

Every repository for tenant-owned rows derives from :class:`TenantScopedRepository`; its
``select()`` is the only way those repositories start a query, so the filter cannot be
forgotten. Another tenant's row is simply not found, which the routers turn into a 404.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from common.ids import is_plausible_id

ModelT = TypeVar("ModelT")


class TenantScopedRepository(Generic[ModelT]):
    model: type[ModelT]

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def select(self, *entities: Any) -> Select[Any]:
        model: Any = self.model
        stmt = select(*entities) if entities else select(model)
        return stmt.where(model.tenant_id == self.tenant_id)

    def get(self, object_id: str) -> ModelT | None:
        if not is_plausible_id(object_id):
            return None
        model: Any = self.model
        row: ModelT | None = self.session.scalars(
            self.select().where(model.id == object_id)
        ).first()
        return row

    def add(self, row: ModelT) -> ModelT:
        if getattr(row, "tenant_id", None) != self.tenant_id:
            raise ValueError("row belongs to another tenant")
        self.session.add(row)
        return row

"""Queries for base models (platform-wide) and fine-tuned models (tenant-scoped)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.scoping import TenantScopedRepository
from common.ids import is_plausible_id
from models_db.models import BaseModel, FineTunedModel


class BaseModelRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, name: str) -> BaseModel | None:
        return self.session.get(BaseModel, name) if is_plausible_id(name) else None

    def get_enabled(self, name: str) -> BaseModel | None:
        row = self.get(name)
        return row if row is not None and row.enabled else None

    def list(self, *, include_disabled: bool = False) -> Sequence[BaseModel]:
        stmt = select(BaseModel).order_by(BaseModel.id)
        if not include_disabled:
            stmt = stmt.where(BaseModel.enabled.is_(True))
        return self.session.scalars(stmt).all()

    def add(self, row: BaseModel) -> BaseModel:
        self.session.add(row)
        return row


class FineTunedModelRepository(TenantScopedRepository[FineTunedModel]):
    model = FineTunedModel

    def get_live(self, name: str) -> FineTunedModel | None:
        row = self.get(name)
        return row if row is not None and row.retired_at is None else None

    def list_live(self) -> Sequence[FineTunedModel]:
        stmt = self.select().where(FineTunedModel.retired_at.is_(None))
        return self.session.scalars(stmt.order_by(FineTunedModel.created_at)).all()

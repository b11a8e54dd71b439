"""The model catalog: registering base models, listing what a tenant may use, retiring models."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy.orm import Session

from api.catalog.repository import BaseModelRepository, FineTunedModelRepository
from api.catalog.schemas import ModelObject
from api.errors import NotFound, PermissionDenied
from api.tenancy.service import Principal
from common.ids import show_id
from models_db.base import now_ts
from models_db.models import AuditLogEntry, BaseModel

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
PLATFORM_OWNER = "loraplex"


class RegistrationError(ValueError):
    pass


def _inspect_local_source(folder: Path) -> dict[str, object]:
    """Check a local model folder the way the trainer will load it (safetensors only)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise RegistrationError(f"{folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise RegistrationError(
            f"{folder} has no .safetensors weights (only safetensors are ever loaded)"
        )
    config = json.loads(config_path.read_text())
    return {
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "context_length": config.get("max_position_embeddings"),
    }


def register_base_model(
    session: Session, name: str, source: str, *, context_length: int | None = None
) -> BaseModel:
    """Register (or update the source of) a base model that tenants may fine-tune."""
    if not _NAME_RE.match(name) or ":" in name or ".." in name:
        raise RegistrationError(
            f"invalid model name {name!r}: letters, digits, '.', '_', '-', '/' only"
        )
    info: dict[str, object] = {}
    if "://" not in source and Path(source).expanduser().exists():
        folder = Path(source).expanduser().resolve()
        info = _inspect_local_source(folder)
        source = str(folder)
    elif not source.startswith("s3://") and not re.match(r"^[\w.-]+/[\w.-]+$", source):
        raise RegistrationError(
            f"source {source!r} is neither an existing folder, an s3:// prefix nor a hub id"
        )
    detected = info.get("context_length")
    length = context_length or (detected if isinstance(detected, int) else 2048)
    repo = BaseModelRepository(session)
    row = repo.get(name)
    if row is None:
        row = repo.add(BaseModel(id=name, source=source, context_length=length, info=info))
    else:
        row.source, row.context_length, row.info, row.enabled = source, length, info, True
    session.add(
        AuditLogEntry(
            tenant_id=None,
            actor="cli",
            action="base_model.register",
            target_type="base_model",
            target_id=name,
            data={"source": source},
        )
    )
    session.flush()
    return row


def list_models(session: Session, principal: Principal) -> list[ModelObject]:
    base = [
        ModelObject(id=m.id, created=m.created_at, owned_by=PLATFORM_OWNER)
        for m in BaseModelRepository(session).list()
    ]
    tuned = [
        ModelObject(id=m.id, created=m.created_at, owned_by=principal.tenant_id)
        for m in FineTunedModelRepository(session, principal.tenant_id).list_live()
    ]
    return base + tuned


def get_model(session: Session, principal: Principal, model_id: str) -> ModelObject:
    tuned = FineTunedModelRepository(session, principal.tenant_id).get_live(model_id)
    if tuned is not None:
        return ModelObject(id=tuned.id, created=tuned.created_at, owned_by=principal.tenant_id)
    base = BaseModelRepository(session).get_enabled(model_id)
    if base is not None:
        return ModelObject(id=base.id, created=base.created_at, owned_by=PLATFORM_OWNER)
    raise NotFound(
        f"The model '{show_id(model_id)}' does not exist", param="model", code="model_not_found"
    )


def retire_model(session: Session, principal: Principal, model_id: str) -> str:
    """Retire one of the caller's fine-tuned models; its name is never reused."""
    tuned = FineTunedModelRepository(session, principal.tenant_id).get_live(model_id)
    if tuned is None:
        if BaseModelRepository(session).get_enabled(model_id) is not None:
            raise PermissionDenied(
                f"'{model_id}' is a base model of the platform; only fine-tuned models can "
                "be deleted.",
                code="model_not_deletable",
            )
        raise NotFound(
            f"The model '{show_id(model_id)}' does not exist", param="model", code="model_not_found"
        )
    tuned.retired_at = now_ts()
    session.add(
        AuditLogEntry(
            tenant_id=principal.tenant_id,
            actor=principal.actor,
            action="model.retire",
            target_type="model",
            target_id=model_id,
            data=None,
        )
    )
    session.flush()
    return tuned.id

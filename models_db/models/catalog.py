"""Models that can be used: registered base models and tenants' fine-tuned adapters."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, TenantOwned, Timestamped


class BaseModel(Base, Timestamped):
    __tablename__ = "base_models"

    # The public name, e.g. "tiny-llama" or "Qwen/Qwen2.5-0.5B-Instruct".
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Where the weights come from: a local folder, a hub id or an s3:// prefix.
    source: Mapped[str] = mapped_column(String(1000))
    context_length: Mapped[int] = mapped_column(default=2048)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)


class FineTunedModel(Base, TenantOwned):
    __tablename__ = "fine_tuned_models"

    # ft:{base}:{tenant-slug}:{suffix}:{short-id}; immutable and never reused.
    id: Mapped[str] = mapped_column(String(400), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"), unique=True)
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    # Object-storage prefix holding adapter_config.json, adapter_model.safetensors, manifest.json.
    storage_prefix: Mapped[str] = mapped_column(String(500))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    lora_rank: Mapped[int]
    retired_at: Mapped[int | None]

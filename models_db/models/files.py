"""Uploaded dataset files; their bytes live in object storage."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, TenantOwned


class File(Base, TenantOwned):
    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_tenant_id_id", "tenant_id", "id"),
        Index("ix_files_expiry", "deleted_at", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    # Detected dataset format (chat, dpo, alpaca, sharegpt) and number of examples.
    format: Mapped[str] = mapped_column(String(20))
    examples: Mapped[int]
    status: Mapped[str] = mapped_column(String(20), default="processed")
    # Deleted files keep their row (jobs refer to them) but lose their bytes.
    deleted_at: Mapped[int | None]
    # OpenAI's expires_after: from then on the file is gone for the API, and its bytes are
    # deleted once no unfinished job uses it (workers/file_expiry.py). NULL: kept until deleted.
    expires_at: Mapped[int | None]

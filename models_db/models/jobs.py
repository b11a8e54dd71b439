"""Fine-tuning jobs with their events and checkpoints."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from models_db.base import Base, BigIntPK, TenantOwned


class FineTuningJob(Base, TenantOwned):
    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        Index("ix_fine_tuning_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_fine_tuning_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"))
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int]
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    # {"type": "supervised"|"dpo", "<type>": {"hyperparameters": {...}}} as OpenAI shows it;
    # "auto" values are replaced by the worker's validation stage.
    method: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(20))
    error: Mapped[dict[str, Any] | None]
    fine_tuned_model: Mapped[str | None] = mapped_column(String(400))
    trained_tokens: Mapped[int | None]
    started_at: Mapped[int | None]
    finished_at: Mapped[int | None]
    estimated_finish: Mapped[int | None]
    # Execution bookkeeping (DESIGN §5): attempt fencing and the worker's lease. `attempt` grows
    # with every claim (pauses and resumes too); only `failed_attempts` counts towards
    # `max_attempts`. Its 0 comes from the database, so inserts that name their columns (the
    # API's create statement) need not know it.
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    failed_attempts: Mapped[int] = mapped_column(server_default="0")
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[int | None]
    cancel_requested_at: Mapped[int | None]
    pause_requested_at: Mapped[int | None]
    # Nanosecond time of the latest claim: fair scheduling serves the tenant served longest ago.
    claimed_at_ns: Mapped[int | None]
    # What the validation stage produced: tokenized-data cache keys and their statistics.
    artifacts: Mapped[dict[str, Any] | None]


class JobEvent(Base, TenantOwned):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(10), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any] | None]


class JobCheckpoint(Base, TenantOwned):
    __tablename__ = "job_checkpoints"
    __table_args__ = (Index("ix_job_checkpoints_job_id_step", "job_id", "step", unique=True),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id"))
    step: Mapped[int]
    storage_prefix: Mapped[str] = mapped_column(String(500))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)

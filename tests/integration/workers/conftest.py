"""Jobs run in this test process: a real Postgres, the worker's own functions (validation,
claim and run, reaper) and the real training subprocess on the tiny model, without Celery.

Lifecycle races (a pause or cancel landing at a given moment, a slow download, a worker that
dies) are set up by wrapping one of the worker's collaborators, so each test decides exactly
when its event happens.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from common import ids
from common.jobs import JobStatus
from models_db.base import now_ts
from models_db.models import (
    BaseModel,
    File,
    FineTunedModel,
    FineTuningJob,
    JobEvent,
    OutboxMessage,
    Tenant,
    UsageRecord,
    WebhookDelivery,
    WebhookEndpoint,
)
from models_db.session import transaction
from tests import sample_data
from workers.context import WorkerContext
from workers.settings import WorkerSettings

FAST = {
    "lease_seconds": 4,
    "heartbeat_seconds": 0.2,
    "reaper_seconds": 1.0,
    "checkpoint_every_steps": 2,
    "cancel_grace_seconds": 3.0,
}


@dataclass
class JobRecord:
    """A job row as the test reads it after the fact."""

    status: str
    attempt: int
    failed_attempts: int
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    pause_requested_at: int | None
    cancel_requested_at: int | None
    lease_until: int | None
    worker_id: str | None


@dataclass
class Jobs:
    ctx: WorkerContext
    tenant_id: str
    file_id: str

    @property
    def session_factory(self):  # type: ignore[no-untyped-def]
        return self.ctx.session_factory

    def create(self, *, examples: int = 0, **hyper: Any) -> str:
        """A new job in `validating_files`, as the API writes it (the message is not sent)."""
        file_id = self.file_id if not examples else self.upload(examples)
        params = {
            "batch_size": 4,
            "learning_rate_multiplier": 1.0,
            "n_epochs": 1,
            "lora_rank": 8,
            "lora_alpha": "auto",
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
            "use_dora": False,
            "quantization": "none",
            "max_seq_len": 128,
            "packing": True,
            **hyper,
        }
        with transaction(self.session_factory) as session:
            job = FineTuningJob(
                id=ids.new_id(ids.JOB),
                tenant_id=self.tenant_id,
                base_model_id="tiny-llama",
                training_file_id=file_id,
                seed=7,
                status=JobStatus.VALIDATING_FILES,
                method={"type": "supervised", "supervised": {"hyperparameters": params}},
                max_attempts=3,
            )
            session.add(job)
        return job.id

    def upload(self, examples: int) -> str:
        data = sample_data.chat_jsonl(examples)
        file_id = ids.new_id(ids.FILE)
        key = f"tenants/{self.tenant_id}/files/{file_id}"
        self.ctx.storage.put_bytes(key, data)
        with transaction(self.session_factory) as session:
            session.add(
                File(
                    id=file_id,
                    tenant_id=self.tenant_id,
                    filename="train.jsonl",
                    purpose="fine-tune",
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    storage_key=key,
                    format="chat",
                    examples=examples,
                )
            )
        return file_id

    def queued(self, **hyper: Any) -> str:
        """A job through validation, waiting for a training worker."""
        from workers.jobs.validation import validate_job

        job_id = self.create(**hyper)
        validate_job(self.ctx, job_id)
        assert self.job(job_id).status == JobStatus.QUEUED, self.messages(job_id)
        return job_id

    def run(self, max_jobs: int | None = None) -> int:
        from workers.jobs.runner import run_available_jobs

        return run_available_jobs(self.ctx, max_jobs)

    def claim_only(self) -> str | None:
        """A worker claims the next job and dies at once: nothing runs, the lease stays."""
        from workers.jobs import repository as repo

        with transaction(self.session_factory) as session:
            claim = repo.claim_next(session, "doomed-worker", self.ctx.settings.lease_seconds)
        return None if claim is None else claim.job_id

    def reap(self) -> int:
        from workers.jobs.reaper import reap

        with transaction(self.session_factory) as session:
            return reap(
                session, validation_resend_seconds=self.ctx.settings.validation_resend_seconds
            )

    def job(self, job_id: str) -> JobRecord:
        with transaction(self.session_factory) as session:
            job = session.get(FineTuningJob, job_id)
            assert job is not None
            return JobRecord(
                status=job.status,
                attempt=job.attempt,
                failed_attempts=job.failed_attempts,
                error=job.error,
                fine_tuned_model=job.fine_tuned_model,
                pause_requested_at=job.pause_requested_at,
                cancel_requested_at=job.cancel_requested_at,
                lease_until=job.lease_until,
                worker_id=job.worker_id,
            )

    def messages(self, job_id: str) -> list[str]:
        with transaction(self.session_factory) as session:
            return list(
                session.scalars(
                    select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
                )
            )

    def request(self, job_id: str, what: str) -> None:
        """What the API does on pause/cancel of a running job: set the flag for the worker."""
        column = {"pause": "pause_requested_at", "cancel": "cancel_requested_at"}[what]
        with transaction(self.session_factory) as session:
            session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.status == JobStatus.RUNNING)
                .values({column: now_ts()})
            )

    def resume(self, job_id: str) -> None:
        """What the API does on resume: queue the paused job again."""
        with transaction(self.session_factory) as session:
            job = session.get(FineTuningJob, job_id)
            assert job is not None and job.status == JobStatus.PAUSED
            job.status = JobStatus.QUEUED
            job.pause_requested_at = None

    def expire_lease(self, job_id: str) -> None:
        with transaction(self.session_factory) as session:
            session.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id)
                .values(lease_until=now_ts() - 1)
            )

    def models(self, job_id: str) -> list[FineTunedModel]:
        with transaction(self.session_factory) as session:
            rows = session.scalars(
                select(FineTunedModel).where(FineTunedModel.job_id == job_id)
            ).all()
            session.expunge_all()
            return list(rows)

    def usage(self, job_id: str) -> list[int]:
        with transaction(self.session_factory) as session:
            return list(
                session.scalars(select(UsageRecord.quantity).where(UsageRecord.job_id == job_id))
            )

    def webhooks(self, job_id: str) -> list[str]:
        """Event types of the job's webhook deliveries (the tenant subscribes to all)."""
        with transaction(self.session_factory) as session:
            deliveries = session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.tenant_id == self.tenant_id)
            ).all()
            return [d.event_type for d in deliveries if f'"id":"{job_id}"' in d.body]

    def outbox(self, task: str, job_id: str) -> int:
        with transaction(self.session_factory) as session:
            rows = session.scalars(select(OutboxMessage).where(OutboxMessage.task == task)).all()
            return sum(1 for row in rows if row.args and row.args[0] == job_id)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, fresh_database, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    """A fresh migrated database: Postgres, or SQLite (embedded mode) when a test is
    parametrized with ``indirect=["database_url"]`` and "sqlite"."""
    if getattr(request, "param", "postgres") == "sqlite":
        import migrations

        url = f"sqlite:///{tmp_path / 'embedded.db'}"
        migrations.upgrade(url)
        return url
    return str(fresh_database(migrate=True))


@pytest.fixture
def make_jobs(database_url: str, tiny_model_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: an in-process worker (settings overridable) with a tenant, a file and a
    subscribed webhook endpoint, on a fresh migrated database."""
    contexts: list[WorkerContext] = []
    url = database_url

    def factory(examples: int = 16, **overrides: Any) -> Jobs:
        settings = WorkerSettings(
            database_url=url,
            storage_url=f"file://{tmp_path / 'objects'}",
            data_dir=tmp_path / f"worker-{len(contexts)}",
            secret_key="test-secret-key-" + "x" * 24,
            worker_id=f"test-worker-{len(contexts)}",
            log_level="WARNING",
            **{**FAST, **overrides},
        )
        ctx = WorkerContext.build(settings)
        contexts.append(ctx)
        slug = "j-" + secrets.token_hex(4)
        with transaction(ctx.session_factory) as session:
            if session.get(BaseModel, "tiny-llama") is None:
                session.add(
                    BaseModel(
                        id="tiny-llama", source=str(tiny_model_dir), context_length=512, info={}
                    )
                )
            tenant = Tenant(id=ids.new_id(ids.TENANT), name=slug, slug=slug, max_concurrent_jobs=4)
            session.add(tenant)
            session.flush()
            session.add(
                WebhookEndpoint(
                    id=ids.new_id(ids.WEBHOOK_ENDPOINT),
                    tenant_id=tenant.id,
                    url="https://hooks.example/jobs",
                    events=[
                        "fine_tuning.job.succeeded",
                        "fine_tuning.job.failed",
                        "fine_tuning.job.cancelled",
                    ],
                    secret_encrypted="unused",
                )
            )
        jobs = Jobs(ctx, tenant.id, "")
        jobs.file_id = jobs.upload(examples)
        return jobs

    yield factory
    for ctx in contexts:
        ctx.engine.dispose()


@pytest.fixture
def jobs(make_jobs) -> Iterator[Jobs]:  # type: ignore[no-untyped-def]
    yield make_jobs()

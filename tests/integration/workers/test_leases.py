"""The lease of a running job: kept alive through long downloads, uploads and the parity check,
and a worker that lost it anyway cannot touch what another attempt published."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from common.jobs import JobStatus
from models_db.models import FineTuningJob
from models_db.session import transaction
from tests.integration.workers.conftest import Jobs
from workers.jobs import publish, runner
from workers.jobs import repository as repo
from workers.jobs.parity import ParityResult


@pytest.fixture
def reaper(make_jobs) -> Iterator[Jobs]:  # type: ignore[no-untyped-def]
    """Jobs with a parity check configured, and the worker's reaper thread running."""
    from workers.celery_app import Reaper

    # The gateway is never called: the parity check itself is replaced by each test.
    jobs = make_jobs(gateway_url="http://127.0.0.1:9", parity_check=True)
    thread = Reaper(jobs.ctx)
    thread.start()
    yield jobs
    thread.stop()


@pytest.mark.parametrize("phase", ["base model download", "parity check"])
def test_a_blocking_step_longer_than_the_lease_keeps_the_job(
    reaper: Jobs, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    jobs = reaper
    job_id = jobs.queued()
    longer_than_the_lease = jobs.ctx.settings.lease_seconds + 3
    download = runner.local_model_path

    def slow_download(*args: Any) -> str:
        time.sleep(longer_than_the_lease)  # a multi-GB s3:// base model on a new host
        return download(*args)

    def slow_parity(gateway: str, key: str, adapter: dict[str, str], sample: Any) -> Any:
        time.sleep(longer_than_the_lease)  # the gateway is slow to load the new adapter
        return ParityResult(True, sample["text"], sample["text"])

    if phase == "base model download":
        monkeypatch.setattr(runner, "local_model_path", slow_download)
    else:
        monkeypatch.setattr(publish, "check_parity", slow_parity)
    jobs.run(max_jobs=3)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.SUCCEEDED, messages
    assert job.attempt == 1 and job.failed_attempts == 0
    assert not [m for m in messages if "stopped responding" in m]
    if phase == "parity check":
        assert any(m.startswith("Train/serve parity check passed") for m in messages)


def test_an_attempt_taken_over_while_uploading_cannot_overwrite_the_published_adapter(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = publish.upload_folder
    taken_over: list[str] = []

    def upload(storage: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        if "/models/" in prefix and not taken_over:
            taken_over.append(prefix)
            # This worker lost the database for longer than its lease: the reaper re-queued
            # the job, and another worker trained and published it, before this upload ran.
            with transaction(jobs.session_factory) as session:
                job = session.get(FineTuningJob, job_id)
                assert job is not None
                job.status, job.worker_id, job.lease_until = JobStatus.QUEUED, None, None
            jobs.run()
            assert jobs.job(job_id).status == JobStatus.SUCCEEDED
        return real(storage, local, prefix, metadata)

    monkeypatch.setattr(publish, "upload_folder", upload)
    jobs.run(max_jobs=1)

    assert jobs.job(job_id).status == JobStatus.SUCCEEDED
    (model,) = jobs.models(job_id)
    manifest = jobs.ctx.storage.get_bytes(f"{model.storage_prefix}/manifest.json")
    assert hashlib.sha256(manifest).hexdigest() == model.manifest_sha256
    assert json.loads(manifest)["fine_tuned_model"] == model.id
    # The late attempt's own upload is gone: only the published folder is left.
    keys = jobs.ctx.storage.list_keys(f"tenants/{jobs.tenant_id}/models/")
    assert keys and all(k.startswith(f"{model.storage_prefix}/") for k in keys), keys


class _Outage:
    """The database refuses the lease's and the heartbeat's updates for a while, from the moment
    the first training process starts (a failover; a pool that cannot hand out connections)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.seconds = seconds
        self.until = 0.0
        self.processes: list[runner.TrainingProcess] = []
        real_touch = repo.touch
        outage = self

        def touch(*args: Any, **kwargs: Any) -> repo.Flags:
            if time.monotonic() < outage.until:
                raise OperationalError(
                    "UPDATE fine_tuning_jobs", {}, Exception("server closed the connection")
                )
            return real_touch(*args, **kwargs)

        class OutageAtStart(runner.TrainingProcess):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                outage.processes.append(self)
                if len(outage.processes) == 1:
                    outage.until = time.monotonic() + outage.seconds

        monkeypatch.setattr(repo, "touch", touch)
        monkeypatch.setattr(runner, "TrainingProcess", OutageAtStart)

    def end(self) -> None:
        self.until = 0.0


def test_a_database_outage_shorter_than_the_lease_costs_nothing(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    _Outage(monkeypatch, seconds=jobs.ctx.settings.lease_seconds / 2)

    jobs.run(max_jobs=1)

    job = jobs.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, jobs.messages(job_id)
    assert job.attempt == 1 and job.failed_attempts == 0


def test_a_database_outage_longer_than_the_lease_stops_the_training(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    outage = _Outage(monkeypatch, seconds=3600)

    jobs.run(max_jobs=1)

    (process,) = outage.processes
    assert process.proc.poll() is not None  # no training goes on without a lease
    job = jobs.job(job_id)
    assert job.status == JobStatus.RUNNING  # nothing could be written; the reaper decides
    assert not [m for m in jobs.messages(job_id) if "failed" in m]
    outage.end()
    jobs.expire_lease(job_id)
    assert jobs.reap() == 1
    jobs.run()
    job = jobs.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, jobs.messages(job_id)
    assert job.failed_attempts == 1  # the lost attempt, counted once

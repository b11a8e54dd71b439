"""The validation stage recovers: temporary errors are retried, a dead worker or a lost message
is replaced by the reaper, and a job that cannot be validated fails with a plain message."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common.jobs import VALIDATE_JOB_TASK, JobStatus
from common.storage import StorageError
from models_db.base import now_ts
from models_db.models import FineTuningJob
from models_db.session import transaction
from tests.integration.workers.conftest import Jobs
from workers.jobs.validation import validate_job


class WorkerKilled(BaseException):
    """What the worker's death looks like from inside: nothing after it runs."""


def _break_storage(jobs: Jobs, monkeypatch: pytest.MonkeyPatch, error: BaseException, times: int):  # type: ignore[no-untyped-def]
    """The file's bytes cannot be read for the next ``times`` tries."""
    real = jobs.ctx.storage.open_stream
    left = [times]

    def open_stream(key: str, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        if key.startswith(f"tenants/{jobs.tenant_id}/files/") and left[0] > 0:
            left[0] -= 1
            raise error
        return real(key, *args, **kwargs)

    monkeypatch.setattr(jobs.ctx.storage, "open_stream", open_stream)


def _retry_is_due(jobs: Jobs, job_id: str) -> None:
    """Time passes: the job's wait (or lease) runs out, the reaper sends the message again."""
    jobs.expire_lease(job_id)
    before = jobs.outbox(VALIDATE_JOB_TASK, job_id)
    assert jobs.reap() >= 1
    assert jobs.outbox(VALIDATE_JOB_TASK, job_id) == before + 1


@pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)
def test_a_temporary_storage_error_is_retried_and_the_job_is_queued(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.create()
    _break_storage(jobs, monkeypatch, StorageError("connection reset by peer"), times=1)

    validate_job(jobs.ctx, job_id)  # no exception: the task is over, the job is not

    job = jobs.job(job_id)
    assert job.status == JobStatus.VALIDATING_FILES and job.worker_id is None
    assert job.failed_attempts == 1
    assert any("temporary problem" in m for m in jobs.messages(job_id))
    _retry_is_due(jobs, job_id)
    validate_job(jobs.ctx, job_id)
    job = jobs.job(job_id)
    assert job.status == JobStatus.QUEUED, jobs.messages(job_id)
    # Training starts with the whole failure budget, and its first attempt is attempt 1.
    assert job.failed_attempts == 0 and job.attempt == 0


def test_validation_that_keeps_failing_fails_the_job_with_a_plain_message(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.create()
    _break_storage(jobs, monkeypatch, StorageError("503 Slow Down"), times=99)

    validate_job(jobs.ctx, job_id)
    for _ in range(2):
        _retry_is_due(jobs, job_id)
        validate_job(jobs.ctx, job_id)

    job = jobs.job(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "validation_error"
    assert "internal error" in job.error["message"] and "503" not in job.error["message"]
    assert jobs.webhooks(job_id) == ["fine_tuning.job.failed"]


@pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)
def test_a_worker_that_dies_while_validating_is_replaced(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.create()
    _break_storage(jobs, monkeypatch, WorkerKilled(), times=1)
    with pytest.raises(WorkerKilled):
        validate_job(jobs.ctx, job_id)
    assert jobs.job(job_id).status == JobStatus.VALIDATING_FILES

    _retry_is_due(jobs, job_id)  # its lease ran out

    assert jobs.job(job_id).failed_attempts == 1
    assert any("stopped responding" in m for m in jobs.messages(job_id))
    validate_job(jobs.ctx, job_id)
    assert jobs.job(job_id).status == JobStatus.QUEUED, jobs.messages(job_id)


@pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)
def test_a_lost_validation_message_is_sent_again(jobs: Jobs) -> None:
    job_id = jobs.create()
    assert jobs.reap() == 0  # a new job's message is on its way
    with transaction(jobs.session_factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        job.created_at = now_ts() - jobs.ctx.settings.validation_resend_seconds - 1

    assert jobs.reap() == 1
    assert jobs.outbox(VALIDATE_JOB_TASK, job_id) == 1
    assert jobs.reap() == 0  # once per wait, not on every pass
    validate_job(jobs.ctx, job_id)
    assert jobs.job(job_id).status == JobStatus.QUEUED
    assert jobs.job(job_id).failed_attempts == 0


def test_the_wait_before_a_retry_is_the_workers_setting(
    make_jobs: Callable[..., Jobs], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = make_jobs(validation_retry_seconds=600)
    job_id = jobs.create()
    _break_storage(jobs, monkeypatch, StorageError("connection reset by peer"), times=1)

    validate_job(jobs.ctx, job_id)

    lease_until = jobs.job(job_id).lease_until
    assert lease_until is not None and 590 <= lease_until - now_ts() <= 600
    assert jobs.reap() == 0  # the retry waits its 10 minutes


def test_the_reaper_thread_sends_a_lost_message_again_after_the_workers_setting(
    make_jobs: Callable[..., Jobs],
) -> None:
    from workers.celery_app import Reaper

    jobs = make_jobs(validation_resend_seconds=1, reaper_seconds=0.2)
    job_id = jobs.create()  # its message is lost: nothing sends it
    reaper = Reaper(jobs.ctx)
    reaper.start()
    try:
        deadline = time.monotonic() + 15
        while jobs.outbox(VALIDATE_JOB_TASK, job_id) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        reaper.stop()

    assert jobs.outbox(VALIDATE_JOB_TASK, job_id) == 1  # after seconds, not 5 minutes


def test_a_second_message_while_a_worker_validates_does_nothing(jobs: Jobs) -> None:
    from workers.jobs import repository as repo

    job_id = jobs.create()
    with transaction(jobs.session_factory) as session:
        assert repo.claim_validation(session, job_id, "busy-worker", 60) is not None

    validate_job(jobs.ctx, job_id)

    job = jobs.job(job_id)
    assert job.status == JobStatus.VALIDATING_FILES and job.worker_id == "busy-worker"
    assert jobs.messages(job_id) == []


def test_a_file_whose_bytes_are_gone_fails_at_once(jobs: Jobs) -> None:
    job_id = jobs.create()
    jobs.ctx.storage.delete_prefix(f"tenants/{jobs.tenant_id}/files/")

    validate_job(jobs.ctx, job_id)

    job = jobs.job(job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "invalid_file"
    assert "upload it again" in job.error["message"]

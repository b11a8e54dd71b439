"""Pause and cancel requests landing at every stage of a training attempt: before the training
process starts, while it starts, when the attempt fails, and when the worker dies."""

from __future__ import annotations

from typing import Any

import pytest

from common.jobs import JobStatus
from tests.integration.workers.conftest import Jobs
from workers.jobs import publish, runner


def _paused_then_resumed_to_the_end(jobs: Jobs, job_id: str) -> None:
    jobs.resume(job_id)
    jobs.run()
    assert jobs.job(job_id).status == JobStatus.SUCCEEDED, jobs.messages(job_id)


def test_a_pause_asked_for_while_the_worker_prepares_pauses_the_job(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = runner.local_model_path

    def slow_download(*args: Any) -> str:
        jobs.request(job_id, "pause")  # the tenant pauses while the base model downloads
        return real(*args)

    monkeypatch.setattr(runner, "local_model_path", slow_download)
    jobs.run()

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.PAUSED, messages
    assert job.attempt == 1 and job.pause_requested_at is None
    assert not [m for m in messages if "failed" in m]
    monkeypatch.setattr(runner, "local_model_path", real)
    _paused_then_resumed_to_the_end(jobs, job_id)


def test_a_pause_asked_for_as_the_training_process_starts_pauses_at_a_checkpoint(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()

    class PausedAtOnce(runner.TrainingProcess):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            jobs.request(job_id, "pause")  # before the child has even imported anything

    monkeypatch.setattr(runner, "TrainingProcess", PausedAtOnce)
    jobs.run(max_jobs=1)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.PAUSED, messages
    (paused,) = [m for m in messages if m.startswith("Job paused at step ")]
    step = int(paused.split()[4].rstrip(";"))
    assert 1 <= step < 4 and f"Checkpoint saved at step {step}." in messages
    monkeypatch.setattr(runner, "TrainingProcess", PausedAtOnce.__mro__[1])
    _paused_then_resumed_to_the_end(jobs, job_id)
    assert f"Resumed training from the checkpoint at step {step}." in jobs.messages(job_id)


def test_an_attempt_that_fails_with_a_pause_pending_pauses_the_job(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = runner.local_tokenized
    failures = []

    def flaky_download(*args: Any) -> Any:
        if not failures:
            failures.append(1)
            jobs.request(job_id, "pause")
            raise OSError("No space left on device")
        return real(*args)

    monkeypatch.setattr(runner, "local_tokenized", flaky_download)
    jobs.run()

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.PAUSED, messages
    assert job.attempt == 1
    # The tenant learns the kind of failure; the detail (paths, hosts) stays in the logs.
    assert any("internal error (OSError)" in m and "paused as requested" in m for m in messages)
    assert not any("No space left on device" in m for m in messages)
    _paused_then_resumed_to_the_end(jobs, job_id)


def _cancelled_and_nothing_published(jobs: Jobs, job_id: str) -> None:
    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.CANCELLED, messages
    assert job.fine_tuned_model is None and job.error is None
    assert jobs.models(job_id) == [] and jobs.usage(job_id) == []
    assert jobs.webhooks(job_id) == ["fine_tuning.job.cancelled"]
    assert jobs.ctx.storage.list_keys(f"tenants/{jobs.tenant_id}/models/") == []


def test_a_cancel_during_the_publish_publishes_nothing(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = publish.upload_folder

    def upload(*args: Any) -> Any:
        uploaded = real(*args)
        if "/models/" in args[2]:
            jobs.request(job_id, "cancel")  # after the adapter upload, before the final commit
        return uploaded

    monkeypatch.setattr(publish, "upload_folder", upload)
    jobs.run()

    _cancelled_and_nothing_published(jobs, job_id)


@pytest.mark.parametrize("ending", ["done", "paused"])
def test_a_cancel_as_the_training_process_ends_cancels_the_job(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    job_id = jobs.queued()

    class CancelledAsItEnds(runner.TrainingProcess):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if ending == "paused":
                jobs.request(job_id, "pause")

        def wait(self, exit_grace: float = 60.0) -> int:
            code = super().wait(exit_grace)
            jobs.request(job_id, "cancel")  # the child has exited, the attempt is not over
            return code

    monkeypatch.setattr(runner, "TrainingProcess", CancelledAsItEnds)
    jobs.run()

    _cancelled_and_nothing_published(jobs, job_id)


@pytest.mark.parametrize("database_url", ["postgres", "sqlite"], indirect=True)
def test_an_attempt_that_fails_with_a_cancel_pending_cancels_the_job(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()

    def failing_download(*args: Any) -> Any:
        jobs.request(job_id, "cancel")
        raise OSError("No space left on device")

    monkeypatch.setattr(runner, "local_tokenized", failing_download)
    jobs.run()

    _cancelled_and_nothing_published(jobs, job_id)
    assert jobs.job(job_id).attempt == 1


def test_pauses_and_resumes_leave_the_failure_budget_whole(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models_db.session import transaction
    from workers.jobs import repository as repo

    job_id = jobs.queued()
    for _ in range(2):  # two pause/resume cycles, as the worker and the API record them
        with transaction(jobs.session_factory) as session:
            claim = repo.claim_next(session, "earlier-worker", 60)
        assert claim is not None
        with transaction(jobs.session_factory) as session:
            repo.finish(session, claim, JobStatus.PAUSED)
        jobs.resume(job_id)
    real = runner.local_tokenized
    failures: list[int] = []

    def flaky_download(*args: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OSError("Connection reset by peer")
        return real(*args)

    monkeypatch.setattr(runner, "local_tokenized", flaky_download)
    jobs.run()

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.SUCCEEDED, messages
    assert job.attempt == 4 and job.failed_attempts == 1
    assert any(
        m.startswith("Attempt 3 failed (1 of 3 allowed failures): internal error (OSError)")
        for m in messages
    ), messages

"""Pause and cancel requests landing at every stage of a training attempt: before the training
process starts, while it starts, when the attempt fails, and when the worker dies."""

from __future__ import annotations

from typing import Any

import pytest

from common.jobs import JobStatus
from tests.integration.workers.conftest import Jobs
from workers.jobs import runner


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
    assert any("No space left on device" in m and "paused as requested" in m for m in messages)
    _paused_then_resumed_to_the_end(jobs, job_id)

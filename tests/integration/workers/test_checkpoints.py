"""Checkpoints of a running job: a failed upload is skipped, not fatal."""

from __future__ import annotations

from typing import Any

import pytest

from common.jobs import JobStatus
from common.storage import StorageError
from tests.integration.workers.conftest import Jobs
from workers.jobs import runner


def test_a_checkpoint_that_cannot_be_uploaded_is_skipped(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = runner.upload_folder

    def upload(storage: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        if "/checkpoints/step-2-" in prefix:
            raise StorageError("503 Slow Down")
        return real(storage, local, prefix, metadata)

    monkeypatch.setattr(runner, "upload_folder", upload)
    jobs.run(max_jobs=1)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.SUCCEEDED, messages
    assert job.attempt == 1 and job.failed_attempts == 0
    assert any(m.startswith("The checkpoint at step 2 could not be saved") for m in messages)
    assert "Checkpoint saved at step 2." not in messages


def test_a_checkpoint_leaves_the_workers_disk_once_it_is_saved(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued(batch_size=2)  # 8 steps: checkpoints at 2, 4 and 6
    real = runner.upload_folder
    on_disk: list[list[str]] = []

    def upload(storage: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        if "/checkpoints/" in prefix:
            on_disk.append(sorted(p.name for p in local.parent.glob("checkpoint-*")))
        return real(storage, local, prefix, metadata)

    monkeypatch.setattr(runner, "upload_folder", upload)
    jobs.run(max_jobs=1)

    assert jobs.job(job_id).status == JobStatus.SUCCEEDED, jobs.messages(job_id)
    # When each checkpoint is uploaded, the ones before it are already gone (later ones may
    # be there: the training does not wait for the upload).
    assert [folders[0] for folders in on_disk] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

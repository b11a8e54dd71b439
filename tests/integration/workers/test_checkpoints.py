"""Checkpoints of a job: a failed upload is skipped, not fatal; a corrupt one is skipped on
resume; superseded ones and what dead or fenced-out attempts uploaded leave the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from common.jobs import SWEEP_JOB_TASK, JobStatus
from common.storage import StorageError
from models_db.models import FineTuningJob, JobCheckpoint
from models_db.session import transaction
from tests.integration.workers.conftest import Jobs
from workers.jobs import publish, runner
from workers.jobs.cleanup import (
    OWNER_FILE,
    adapters_root,
    checkpoints_root,
    sweep_scratch,
    sweep_unreferenced,
)


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


# -- resuming from a checkpoint that turns out corrupt -------------------------------------------


def _checkpoints(jobs: Jobs, job_id: str) -> list[tuple[int, str]]:
    """(step, storage prefix) of the job's recorded checkpoints, oldest first."""
    with transaction(jobs.session_factory) as session:
        rows = session.execute(
            select(JobCheckpoint.step, JobCheckpoint.storage_prefix)
            .where(JobCheckpoint.job_id == job_id)
            .order_by(JobCheckpoint.step)
        ).all()
    return [(row.step, row.storage_prefix) for row in rows]


def _folders(jobs: Jobs, job_id: str) -> set[str]:
    """The checkpoint folders in storage (``step-N-aA``)."""
    root = f"{checkpoints_root(jobs.tenant_id, job_id)}/"
    return {key[len(root) :].split("/")[0] for key in jobs.ctx.storage.list_keys(root)}


def _a_file_of(jobs: Jobs, prefix: str) -> str:
    manifest = json.loads(jobs.ctx.storage.get_bytes(f"{prefix}/manifest.json"))
    return f"{prefix}/{sorted(manifest['files'])[0]}"


def _damage(jobs: Jobs, prefix: str, how: str) -> None:
    storage = jobs.ctx.storage
    if how == "file":
        storage.put_bytes(_a_file_of(jobs, prefix), b"bit rot")
    elif how == "missing":
        storage.delete(_a_file_of(jobs, prefix))
    elif how == "manifest":
        # Every file still matches this manifest: only the digest recorded with the row tells.
        manifest = json.loads(storage.get_bytes(f"{prefix}/manifest.json"))
        manifest["step"] = 1000
        storage.put_bytes(f"{prefix}/manifest.json", json.dumps(manifest).encode())


def _first_attempt_fails_after_its_checkpoints(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, then: Any
) -> None:
    """The first attempt trains to the end, then its adapter upload fails (so it is retried
    from its checkpoints); ``then`` runs just before, with the checkpoint rows."""
    real = publish.upload_folder
    failed: list[bool] = []

    def upload(storage: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        if not failed:
            failed.append(True)
            then(_checkpoints(jobs, str(metadata["job_id"])))
            raise StorageError("503 Slow Down")
        return real(storage, local, prefix, metadata)

    monkeypatch.setattr(publish, "upload_folder", upload)


@pytest.mark.parametrize(
    ("how", "kind"), [("file", "corrupt"), ("manifest", "corrupt"), ("missing", "missing")]
)
def test_a_resume_falls_back_from_a_corrupt_latest_checkpoint_to_the_one_before(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str, kind: str
) -> None:
    job_id = jobs.queued(batch_size=2)  # 8 steps: checkpoints at 2, 4 and 6

    def damage_the_latest(checkpoints: list[tuple[int, str]]) -> None:
        assert [step for step, _ in checkpoints] == [2, 4, 6]
        _damage(jobs, checkpoints[-1][1], how)

    _first_attempt_fails_after_its_checkpoints(jobs, monkeypatch, damage_the_latest)
    jobs.run(max_jobs=2)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.SUCCEEDED, messages
    assert job.attempt == 2 and job.failed_attempts == 1
    (warning,) = [m for m in messages if "could not be used" in m]
    assert warning == f"The checkpoint at step 6 could not be used ({kind}) and was discarded."
    assert "Resumed training from the checkpoint at step 4." in messages
    # Step 6 trained again by the second attempt is recorded in place of the discarded one,
    # whose objects are gone.
    assert [(step, prefix.rsplit("/", 1)[1]) for step, prefix in _checkpoints(jobs, job_id)] == [
        (2, "step-2-a1"),
        (4, "step-4-a1"),
        (6, "step-6-a2"),
    ]
    assert _folders(jobs, job_id) == {"step-2-a1", "step-4-a1", "step-6-a2"}
    # The tenant reads nothing of the store's layout or the worker's disk.
    assert not [m for m in messages if "tenants/" in m or str(tmp_path) in m]


def test_a_resume_with_no_usable_checkpoint_starts_from_the_beginning(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued(batch_size=2)

    def damage_all(checkpoints: list[tuple[int, str]]) -> None:
        for _step, prefix in checkpoints:
            _damage(jobs, prefix, "file")

    _first_attempt_fails_after_its_checkpoints(jobs, monkeypatch, damage_all)
    jobs.run(max_jobs=2)

    messages = jobs.messages(job_id)
    assert jobs.job(job_id).status == JobStatus.SUCCEEDED, messages
    assert [m for m in messages if "could not be used" in m] == [
        f"The checkpoint at step {step} could not be used (corrupt) and was discarded."
        for step in (6, 4, 2)
    ]
    assert "No usable checkpoint is left; training starts again from step 0." in messages
    assert not [m for m in messages if m.startswith("Resumed training")]
    assert _folders(jobs, job_id) == {"step-2-a2", "step-4-a2", "step-6-a2"}


def test_a_storage_outage_while_resuming_is_retried_not_a_reason_to_fall_back(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older checkpoint would throw away the steps after it: the attempt fails instead,
    and the next one resumes from the latest."""
    job_id = jobs.queued(batch_size=2)
    _first_attempt_fails_after_its_checkpoints(jobs, monkeypatch, lambda checkpoints: None)
    real = runner.download_folder
    calls: list[str] = []

    def download(storage: Any, prefix: str, local: Path, **kwargs: Any) -> Any:
        calls.append(prefix)
        if len(calls) == 1:
            raise StorageError("connection refused")
        return real(storage, prefix, local, **kwargs)

    monkeypatch.setattr(runner, "download_folder", download)
    jobs.run(max_jobs=3)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.SUCCEEDED, messages
    assert job.attempt == 3 and job.failed_attempts == 2
    assert any(m.startswith("Attempt 2 failed") and "(StorageError)" in m for m in messages)
    assert not [m for m in messages if "could not be used" in m]
    assert "Resumed training from the checkpoint at step 6." in messages
    assert [prefix.rsplit("/", 1)[1] for prefix in calls] == ["step-6-a1", "step-6-a1"]


def test_a_store_that_shows_none_of_the_checkpoints_is_an_outage_not_a_loss(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every checkpoint object gone at once (a store misconfigured or not mounted): discarding
    them would delete their rows for good, so the attempts fail instead and the rows stay."""
    job_id = jobs.queued(batch_size=2)

    def lose_everything(checkpoints: list[tuple[int, str]]) -> None:
        root = checkpoints_root(jobs.tenant_id, job_id)
        jobs.ctx.storage.delete_prefix(f"{root}/")

    _first_attempt_fails_after_its_checkpoints(jobs, monkeypatch, lose_everything)
    jobs.run(max_jobs=3)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.FAILED and job.failed_attempts == 3, messages
    assert any(m.startswith("Attempt 2 failed") and "(StorageError)" in m for m in messages)
    assert not [m for m in messages if "could not be used" in m]
    assert [step for step, _ in _checkpoints(jobs, job_id)] == [2, 4, 6]


# -- what is left in object storage --------------------------------------------------------------


def test_only_the_newest_checkpoints_are_kept(make_jobs: Any) -> None:
    jobs = make_jobs(checkpoint_keep=2)
    job_id = jobs.queued(batch_size=2)
    jobs.run(max_jobs=1)

    messages = jobs.messages(job_id)
    assert jobs.job(job_id).status == JobStatus.SUCCEEDED, messages
    assert "Checkpoint saved at step 2." in messages  # recorded, then superseded
    assert [step for step, _ in _checkpoints(jobs, job_id)] == [4, 6]
    assert _folders(jobs, job_id) == {"step-4-a1", "step-6-a1"}


def test_keeping_fewer_than_two_checkpoints_is_refused(make_jobs: Any) -> None:
    with pytest.raises(ValueError, match="checkpoint_keep"):
        make_jobs(checkpoint_keep=1)


def test_a_checkpoint_uploaded_by_an_attempt_fenced_out_meanwhile_is_deleted(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued(batch_size=2)
    real = runner.upload_folder
    uploaded: list[set[str]] = []

    def upload(storage: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        result = real(storage, local, prefix, metadata)
        if "/checkpoints/step-4-" in prefix:
            uploaded.append(_folders(jobs, job_id))
            # Another worker claimed the job while this upload ran (this one's lease lapsed).
            with transaction(jobs.session_factory) as session:
                job = session.get(FineTuningJob, job_id)
                assert job is not None
                job.attempt += 1
        return result

    monkeypatch.setattr(runner, "upload_folder", upload)
    jobs.run(max_jobs=1)

    assert uploaded == [{"step-2-a1", "step-4-a1"}]
    assert [step for step, _ in _checkpoints(jobs, job_id)] == [2]
    assert _folders(jobs, job_id) == {"step-2-a1"}


def test_an_ended_job_keeps_only_the_checkpoint_folders_its_rows_point_at(jobs: Jobs) -> None:
    job_id = jobs.queued(batch_size=2)
    storage = jobs.ctx.storage
    root = checkpoints_root(jobs.tenant_id, job_id)
    # Left by attempts that died mid-upload (names close to the ones that will be recorded).
    for folder in ("step-2-a0", "step-2-a10", "step-4-a1-partial"):
        storage.put_bytes(f"{root}/{folder}/adapter_model.safetensors", b"half")
    other_job = f"{checkpoints_root(jobs.tenant_id, 'ftjob-other')}/step-2-a0/x"
    storage.put_bytes(other_job, b"not this job's")
    # And an adapter upload of an attempt that died while publishing.
    adapters = adapters_root(jobs.tenant_id, job_id)
    storage.put_bytes(f"{adapters}/a0/adapter_model.safetensors", b"half")

    assert sweep_unreferenced(jobs.ctx, jobs.tenant_id, job_id) == 0  # not ended yet
    assert "step-2-a0" in _folders(jobs, job_id)
    jobs.run(max_jobs=1)

    assert jobs.job(job_id).status == JobStatus.SUCCEEDED, jobs.messages(job_id)
    recorded = _checkpoints(jobs, job_id)
    assert _folders(jobs, job_id) == {prefix.rsplit("/", 1)[1] for _, prefix in recorded}
    assert all(storage.exists(f"{prefix}/manifest.json") for _, prefix in recorded)
    assert storage.exists(other_job)
    (published,) = jobs.models(job_id)
    assert {key.rsplit("/", 1)[0] for key in storage.list_keys(f"{adapters}/")} == {
        published.storage_prefix
    }


def test_a_running_attempts_scratch_folder_survives_a_worker_starting_meanwhile(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = runner.upload_folder
    swept: list[list[Path]] = []
    owned: list[bool] = []

    def upload(storage: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        if not swept:
            workdir = jobs.ctx.settings.scratch / job_id / "attempt-1"
            owned.append((workdir / OWNER_FILE).is_file())
            swept.append(sweep_scratch(jobs.ctx.settings.scratch))
        return real(storage, local, prefix, metadata)

    monkeypatch.setattr(runner, "upload_folder", upload)
    jobs.run(max_jobs=1)

    assert jobs.job(job_id).status == JobStatus.SUCCEEDED, jobs.messages(job_id)
    assert owned == [True] and swept == [[]]


def test_a_job_ended_without_its_worker_is_swept_by_the_task_its_end_sends(jobs: Jobs) -> None:
    """The reaper giving up on a dead worker (no worker finishes the job, so none sweeps it):
    the transaction that fails the job also sends the sweep task, which leaves only what the
    job's rows point at."""
    from workers.jobs.cleanup import sweep_ended_job

    job_id = jobs.queued()
    root = checkpoints_root(jobs.tenant_id, job_id)
    jobs.ctx.storage.put_bytes(f"{root}/step-2-a1/adapter_model.safetensors", b"half")
    for _ in range(3):  # each worker dies at once; the third loss fails the job
        assert jobs.claim_only() == job_id
        jobs.expire_lease(job_id)
        assert jobs.reap() == 1
    assert jobs.job(job_id).status == JobStatus.FAILED
    assert jobs.outbox(SWEEP_JOB_TASK, job_id) == 1
    assert _folders(jobs, job_id) == {"step-2-a1"}

    assert sweep_ended_job(jobs.ctx, job_id) == 1
    assert _folders(jobs, job_id) == set()
    assert sweep_ended_job(jobs.ctx, job_id) == 0  # a second delivery finds nothing

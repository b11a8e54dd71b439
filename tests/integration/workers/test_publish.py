"""Publishing an adapter: an upload that will never be published does not stay in the store."""

from __future__ import annotations

from typing import Any

import pytest

from common.jobs import JobStatus
from common.storage import StorageError
from workers.jobs import publish
from workers.jobs.parity import ParityResult


def test_a_model_that_fails_the_parity_check_leaves_no_upload(
    make_jobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = make_jobs(gateway_url="http://127.0.0.1:9", parity_check=True)
    job_id = jobs.queued()
    checked: list[list[str]] = []

    def parity(gateway: str, key: str, adapter: dict[str, str], sample: Any) -> ParityResult:
        checked.append(jobs.ctx.storage.list_keys(f"{adapter['storage_prefix']}/"))
        return ParityResult(False, sample["text"], "something else")

    monkeypatch.setattr(publish, "check_parity", parity)
    jobs.run(max_jobs=1)

    job = jobs.job(job_id)
    assert job.status == JobStatus.FAILED, jobs.messages(job_id)
    assert job.error is not None and job.error["code"] == "parity_mismatch"
    assert len(checked) == 1 and checked[0]  # the gateway was shown a whole folder
    assert jobs.models(job_id) == []
    assert jobs.ctx.storage.list_keys(f"tenants/{jobs.tenant_id}/models/") == []


def test_an_adapter_upload_that_fails_midway_is_deleted(
    jobs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = jobs.queued()
    real = publish.upload_folder
    storage = jobs.ctx.storage
    failures: list[str] = []

    class FailsAfterTheFirstFile:
        """The store stops answering after one file of the first adapter upload."""

        def __getattr__(self, name: str) -> Any:
            return getattr(storage, name)

        def put_file(self, key: str, path: Any) -> Any:
            if failures:
                raise StorageError("connection reset")
            failures.append(key)
            return storage.put_file(key, path)

    def upload(store: Any, local: Any, prefix: str, metadata: dict[str, Any]) -> Any:
        if not failures:
            return real(FailsAfterTheFirstFile(), local, prefix, metadata)
        return real(store, local, prefix, metadata)

    monkeypatch.setattr(publish, "upload_folder", upload)
    jobs.run(max_jobs=2)

    job = jobs.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, jobs.messages(job_id)
    assert job.attempt == 2 and failures and failures[0].split("/")[-2] == "a1"
    (model,) = jobs.models(job_id)
    keys = storage.list_keys(f"tenants/{jobs.tenant_id}/models/")
    assert keys and all(k.startswith(f"{model.storage_prefix}/") for k in keys), keys

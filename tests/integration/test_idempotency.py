"""Idempotency-Key: concurrent retries of one create make exactly one job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests import sample_data
from tests.conftest import RunningApi


def test_twenty_concurrent_creates_with_one_key_make_one_job(
    api_server: RunningApi, make_tenant
) -> None:  # type: ignore[no-untyped-def]
    creds = make_tenant()
    auth = {"Authorization": f"Bearer {creds.api_key}"}
    with httpx.Client(base_url=api_server.base_url, headers=auth, timeout=30) as http:
        file_id = http.post(
            "/v1/files",
            files={"file": ("t.jsonl", sample_data.chat_jsonl())},
            data={"purpose": "fine-tune"},
        ).json()["id"]
        body = {"model": "tiny-llama", "training_file": file_id, "suffix": "once"}

        def create(_: int) -> httpx.Response:
            return http.post(
                "/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k-123"}
            )

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(create, range(20)))
        assert {r.status_code for r in responses} == {200}, [
            r.text for r in responses if r.status_code != 200
        ]
        assert len({r.json()["id"] for r in responses}) == 1
        jobs = http.get("/v1/fine_tuning/jobs").json()["data"]
        assert len(jobs) == 1

        # The same key with a different body is refused rather than silently replayed.
        other = http.post(
            "/v1/fine_tuning/jobs",
            json={**body, "suffix": "twice"},
            headers={"Idempotency-Key": "k-123"},
        )
        assert other.status_code == 400
        assert other.json()["error"]["param"] == "Idempotency-Key"


def test_idempotent_upload_stores_one_file(api_server: RunningApi, make_tenant) -> None:  # type: ignore[no-untyped-def]
    creds = make_tenant()
    auth = {"Authorization": f"Bearer {creds.api_key}", "Idempotency-Key": "upload-1"}
    with httpx.Client(base_url=api_server.base_url, headers=auth) as http:
        ids = {
            http.post(
                "/v1/files",
                files={"file": ("t.jsonl", sample_data.chat_jsonl())},
                data={"purpose": "fine-tune"},
            ).json()["id"]
            for _ in range(3)
        }
        assert len(ids) == 1
        assert len(http.get("/v1/files").json()["data"]) == 1

        # Other bytes of the same name and size under the same key: refused, not answered with
        # the first file (which the client would then train on).
        first = sample_data.chat_jsonl()
        changed = first.replace(b"briefly", b"Briefly", 1)
        assert len(changed) == len(first) and changed != first
        other = http.post(
            "/v1/files", files={"file": ("t.jsonl", changed)}, data={"purpose": "fine-tune"}
        )
        assert other.status_code == 400, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"

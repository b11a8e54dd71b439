"""Each file of the bad-input corpus gets a 400 naming line and reason; nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import httpx
import pytest

from tests.conftest import RunningApi

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "bad_datasets"
EXPECTED: dict[str, dict[str, object]] = json.loads((CORPUS / "expected.json").read_text())


def _stored_keys(api: RunningApi, tenant_id: str) -> list[str]:
    settings = api.settings
    bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")  # type: ignore[attr-defined]
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name="us-east-1")  # type: ignore[attr-defined]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/tenants/{tenant_id}/")
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return [o["Key"] for o in listed.get("Contents", [])] + [
        u["Key"] for u in uploads if tenant_id in u["Key"]
    ]


@pytest.fixture(scope="module")
def tenant(api_server: RunningApi, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue("make_tenant")()


def test_corpus_is_large_enough() -> None:
    assert len(EXPECTED) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_refused(api_server: RunningApi, tenant, name: str) -> None:  # type: ignore[no-untyped-def]
    spec = EXPECTED[name]
    if spec.get("limits"):
        pytest.skip("needs non-default limits; covered by the validator's unit tests")
    data = (CORPUS / name).read_bytes()
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {tenant.api_key}"}
    ) as http:
        response = http.post(
            "/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == spec["code"], error
    assert error["param"] == "file"
    if spec.get("line") is not None:
        assert f"line {spec['line']}" in error["message"], error["message"]
    assert _stored_keys(api_server, tenant.tenant_id) == []


def test_oversized_upload_is_refused_without_storing(api_server: RunningApi, tenant) -> None:  # type: ignore[no-untyped-def]
    limit = api_server.settings.max_file_bytes  # type: ignore[attr-defined]
    line = (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "'
        + b"x" * 1000
        + b'"}]}\n'
    )
    data = line * (limit // len(line) + 2)
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {tenant.api_key}"}
    ) as http:
        response = http.post(
            "/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "fine-tune"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "file_too_large"
    assert _stored_keys(api_server, tenant.tenant_id) == []

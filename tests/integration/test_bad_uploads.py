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


def test_an_upload_over_the_storage_quota_is_a_429_the_sdk_does_not_retry(
    api_server: RunningApi, make_tenant
) -> None:  # type: ignore[no-untyped-def]
    import io

    import openai

    from models_db.models import Tenant
    from models_db.session import transaction
    from tests import sample_data

    creds = make_tenant()
    data = sample_data.chat_jsonl()
    with transaction(api_server.session_factory) as session:  # type: ignore[arg-type]
        row = session.get(Tenant, creds.tenant_id)
        assert row is not None
        row.max_stored_bytes = len(data) + len(data) // 2  # room for one file
    client = openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=creds.api_key)
    client.files.create(file=("a.jsonl", io.BytesIO(data)), purpose="fine-tune")
    with httpx.Client(base_url=api_server.base_url) as http:
        response = http.post(
            "/v1/files",
            files={"file": ("b.jsonl", data)},
            data={"purpose": "fine-tune"},
            headers={"Authorization": f"Bearer {creds.api_key}"},
        )
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "storage_quota_exceeded"
    assert response.headers["retry-after"] == "60"
    # The SDK gives up at once (one request) instead of waiting out Retry-After twice.
    sent: list[httpx.Request] = []
    counting = openai.OpenAI(
        base_url=f"{api_server.base_url}/v1",
        api_key=creds.api_key,
        max_retries=2,
        http_client=httpx.Client(event_hooks={"request": [sent.append]}),
    )
    with pytest.raises(openai.RateLimitError):
        counting.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert len(sent) == 1
    assert _stored_keys(api_server, creds.tenant_id) != []  # the first file is kept

"""Tenant isolation matrix: every endpoint x every kind of caller -> the expected status.

Tenant B owns a file, a job and a fine-tuned model. Tenant A's callers (its own objects,
B's objects, no key, a revoked key, a key without the scope) hit every endpoint; nothing of
B's may appear in any response body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest

from tests import sample_data
from tests.conftest import RunningApi, TenantCreds


@dataclass
class Owned:
    creds: TenantCreds
    file_id: str
    job_id: str
    model_id: str
    hook_id: str
    secrets: tuple[str, ...]  # strings that must never reach another tenant


def _populate(api: RunningApi, creds: TenantCreds) -> Owned:
    from models_db.models import FineTunedModel, FineTuningJob
    from models_db.session import transaction

    http = httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {creds.api_key}"})
    uploaded = http.post(
        "/v1/files",
        files={"file": (f"secret-{creds.slug}.jsonl", sample_data.chat_jsonl())},
        data={"purpose": "fine-tune"},
    )
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    job = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    model_id = f"ft:tiny-llama:{creds.slug}:iso:{job_id[-8:]}"
    with transaction(api.session_factory) as session:  # type: ignore[arg-type]
        row = session.get(FineTuningJob, job_id)
        assert row is not None
        row.status, row.fine_tuned_model = "succeeded", model_id
        session.add(
            FineTunedModel(
                id=model_id,
                tenant_id=creds.tenant_id,
                job_id=job_id,
                base_model_id="tiny-llama",
                storage_prefix=f"tenants/{creds.tenant_id}/models/x",
                manifest_sha256="0" * 64,
                lora_rank=8,
            )
        )
    # A global IP literal: accepted without DNS and without the SSRF allow list.
    hook = http.post("/v1/webhook_endpoints", json={"url": "https://93.184.216.34/hook"})
    assert hook.status_code == 200, hook.text
    hook_id = hook.json()["id"]
    return Owned(
        creds,
        file_id,
        job_id,
        model_id,
        hook_id,
        (creds.tenant_id, file_id, job_id, model_id, hook_id, creds.slug),
    )


@pytest.fixture(scope="module")
def world(api_server: RunningApi, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    make = request.getfixturevalue("make_tenant")
    a, b = make(), make()
    return _populate(api_server, a), _populate(api_server, b)


# (method, path template, json body or None, is the object in the path)
ENDPOINTS = [
    ("GET", "/v1/files", None, False),
    ("GET", "/v1/files/{file}", None, True),
    ("GET", "/v1/files/{file}/content", None, True),
    ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-llama", "training_file": "{file}"}, True),
    ("GET", "/v1/fine_tuning/jobs", None, False),
    ("GET", "/v1/fine_tuning/jobs/{job}", None, True),
    ("GET", "/v1/fine_tuning/jobs/{job}/events", None, True),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints", None, True),
    ("POST", "/v1/fine_tuning/jobs/{job}/cancel", None, True),
    ("POST", "/v1/fine_tuning/jobs/{job}/pause", None, True),
    ("POST", "/v1/fine_tuning/jobs/{job}/resume", None, True),
    ("GET", "/v1/models", None, False),
    ("GET", "/v1/models/{model}", None, True),
    ("DELETE", "/v1/models/{model}", None, True),
    ("GET", "/v1/webhook_endpoints", None, False),
    ("GET", "/v1/webhook_endpoints/{hook}", None, True),
    ("POST", "/v1/webhook_endpoints/{hook}", {"description": "renamed"}, True),
    ("GET", "/v1/webhook_endpoints/{hook}/deliveries", None, True),
    ("POST", "/v1/webhook_endpoints/{hook}/rotate_secret", None, True),
    ("POST", "/v1/webhook_endpoints/{hook}/disable", None, True),
    ("POST", "/v1/webhook_endpoints/{hook}/enable", None, True),
    ("POST", "/v1/webhook_endpoints/{hook}/test", None, True),
    ("DELETE", "/v1/webhook_endpoints/{hook}", None, True),
    ("DELETE", "/v1/files/{file}", None, True),  # last: it deletes the file
]

CALLERS = ["own", "other", "no_key", "revoked", "wrong_scope"]


def _expected(method: str, path: str, in_path: bool, caller: str) -> int:
    if caller in ("no_key", "revoked"):
        return 401
    if caller == "wrong_scope":
        # The key holds only "inference": model listing is allowed, the rest is not.
        return 200 if path.startswith("/v1/models") and method == "GET" else 403
    if caller == "own" and path.endswith(("/cancel", "/pause", "/resume")):
        return 400  # the job already succeeded
    if caller == "other" and in_path:
        # Another tenant's file named in a body is a bad parameter, in a path a missing object.
        return 400 if method == "POST" and path == "/v1/fine_tuning/jobs" else 404
    return 200


def test_isolation_matrix(api_server: RunningApi, world) -> None:  # type: ignore[no-untyped-def]
    a, b = world
    with httpx.Client(base_url=api_server.base_url) as http:
        from api.tenancy.service import create_api_key, revoke_api_key
        from models_db.models import Tenant
        from models_db.session import transaction
        from tests.conftest import TEST_SECRET

        # Both extra keys belong to tenant A itself: only the key's state differs.
        with transaction(api_server.session_factory) as session:  # type: ignore[arg-type]
            tenant_a = session.get(Tenant, a.creds.tenant_id)
            revoked = create_api_key(session, TEST_SECRET, tenant_a)
            inference_only = create_api_key(session, TEST_SECRET, tenant_a, scopes=("inference",))
            assert revoke_api_key(session, a.creds.tenant_id, revoked.key.id, "test")
        keys = {
            "own": a.creds.api_key,
            "other": a.creds.api_key,
            "no_key": None,
            "revoked": revoked.secret,
            "wrong_scope": inference_only.secret,
        }
        failures = []
        for method, template, body, in_path in ENDPOINTS:
            for caller in CALLERS:
                target = b if caller == "other" else a
                fill = {
                    "file": target.file_id,
                    "job": target.job_id,
                    "model": target.model_id,
                    "hook": target.hook_id,
                }
                path = template.format(**fill)
                payload = (
                    json.loads(json.dumps(body).replace("{file}", target.file_id)) if body else None
                )
                headers = {"Authorization": f"Bearer {keys[caller]}"} if keys[caller] else {}
                response = http.request(method, path, json=payload, headers=headers)
                want = _expected(method, template, in_path, caller)
                if response.status_code != want:
                    failures.append(
                        f"{caller:12} {method} {template}: {response.status_code} != {want}: "
                        + response.text[:200]
                    )
                if response.status_code >= 400:
                    err = response.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"}
                # An error may echo the id the caller sent; nothing else of B's may appear.
                sent = path + json.dumps(payload)
                leaked = [s for s in b.secrets if s in response.text and s not in sent]
                if leaked:
                    failures.append(f"{caller:12} {method} {template}: leaked {leaked}")
        assert not failures, "\n".join(failures)


def test_other_tenants_ids_never_listed(api_server: RunningApi, world) -> None:  # type: ignore[no-untyped-def]
    a, b = world
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {a.creds.api_key}"}
    ) as http:
        for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models", "/v1/webhook_endpoints"):
            text = http.get(path).text
            for secret in b.secrets:
                assert secret not in text, (path, secret)
        # Cursor values from another tenant reveal nothing either.
        assert http.get("/v1/fine_tuning/jobs", params={"after": b.job_id}).status_code == 200
        # An event cursor that is not one of this job's events is refused the same way
        # whether or not it exists elsewhere.
        events = f"/v1/fine_tuning/jobs/{a.job_id}/events"
        unknown = http.get(events, params={"after": "ftevent-01jd0000000000000000000000"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"
        assert "not an event of this job" in unknown.json()["error"]["message"]

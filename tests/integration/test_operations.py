"""Health, readiness, metrics, request ids, body limits, JSON error shape for unknown routes."""

from __future__ import annotations

import json

import httpx

from tests.conftest import RunningApi


def test_health_ready_metrics(api_server: RunningApi) -> None:
    with httpx.Client(base_url=api_server.base_url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
        http.get("/v1/models")
        metrics = http.get("/metrics").text
        assert "loraplex_http_requests_total" in metrics
        assert 'route="/v1/models"' in metrics


def test_request_id_is_returned_and_kept(api_server: RunningApi) -> None:
    with httpx.Client(base_url=api_server.base_url) as http:
        generated = http.get("/healthz").headers["x-request-id"]
        assert generated.startswith("req_")
        assert (
            http.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"]
            == "abc-123"
        )


def test_oversized_json_body_is_413(api_server: RunningApi, make_tenant) -> None:  # type: ignore[no-untyped-def]
    key = make_tenant().api_key
    body = json.dumps(
        {"model": "tiny-llama", "training_file": "x", "metadata": {"k": "v" * 2_000_000}}
    )
    with httpx.Client(base_url=api_server.base_url) as http:
        response = http.post(
            "/v1/fine_tuning/jobs",
            content=body,
            headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_bad_json(api_server: RunningApi, make_tenant) -> None:  # type: ignore[no-untyped-def]
    key = make_tenant().api_key
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        missing = http.get("/v1/nothing-here")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        broken = http.post(
            "/v1/fine_tuning/jobs",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert broken.status_code == 400
        assert broken.json()["error"]["type"] == "invalid_request_error"


def test_openapi_lists_every_endpoint(api_server: RunningApi) -> None:
    paths = httpx.get(api_server.base_url + "/openapi.json").json()["paths"]
    for path in (
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/content",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{job_id}",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        "/v1/models",
        "/v1/models/{model_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path

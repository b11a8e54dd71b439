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
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    with httpx.Client(base_url=api_server.base_url) as http:
        response = http.post("/v1/fine_tuning/jobs", content=body, headers=headers)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    # Without a Content-Length (chunked): counted as it arrives, and the same answer.
    with httpx.Client(base_url=api_server.base_url) as http:
        chunks = (body[i : i + 65536].encode() for i in range(0, len(body), 65536))
        response = http.post("/v1/fine_tuning/jobs", content=chunks, headers=headers)
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


def test_urls_that_name_nothing(api_server: RunningApi, make_tenant) -> None:  # type: ignore[no-untyped-def]
    key = make_tenant().api_key
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        # A trailing slash is an unknown URL, not a redirect (to http://, behind a TLS proxy).
        slash = http.post("/v1/fine_tuning/jobs/", json={})
        assert slash.status_code == 404 and slash.json()["error"]["code"] == "not_found"
        # A trailing newline is refused, not matched as if absent.
        for path in ("/v1/models/tiny-llama%0A", "/v1/files/file-x%0D", "/v1/fine_tuning/jobs/%00"):
            refused = http.get(path)
            assert refused.status_code == 400, path
            assert refused.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/v1/models/tiny-llama").status_code == 200
        # An id echoed in an error is cut short.
        long_id = "file-" + "x" * 10_000
        missing = http.get(f"/v1/files/{long_id}")
        assert missing.status_code == 404 and len(missing.json()["error"]["message"]) < 200


def test_pagination_cursors_must_be_ids_of_the_listed_kind(
    api_server: RunningApi, make_tenant
) -> None:  # type: ignore[no-untyped-def]
    key = make_tenant().api_key
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        for path, wrong in (
            ("/v1/files", "garbage"),
            ("/v1/files", "ftjob-01jd0000000000000000000000"),
            ("/v1/fine_tuning/jobs", "file-01jd0000000000000000000000"),
        ):
            response = http.get(path, params={"after": wrong})
            assert response.status_code == 400, (path, wrong)
            assert response.json()["error"]["param"] == "after"
        # An id of the right kind is a valid cursor even if it names nothing (any more).
        gone = http.get("/v1/files", params={"after": "file-01jd0000000000000000000000"})
        assert gone.status_code == 200


def test_a_field_given_twice_is_refused_not_resolved_silently(  # type: ignore[no-untyped-def]
    api_server: RunningApi, make_tenant
) -> None:
    from tests import sample_data

    a, b = make_tenant().api_key, make_tenant().api_key
    with httpx.Client(base_url=api_server.base_url) as http:
        twice = http.get(
            "/v1/files",
            headers=[("Authorization", f"Bearer {b}"), ("Authorization", f"Bearer {a}")],
        )
        assert twice.status_code == 401 and "More than one" in twice.json()["error"]["message"]
        auth = {"Authorization": f"Bearer {a}"}
        purposes = http.post(
            "/v1/files",
            files=[
                ("purpose", (None, b"assistants")),
                ("purpose", (None, b"fine-tune")),
                ("file", ("t.jsonl", sample_data.chat_jsonl())),
            ],
            headers=auth,
        )
        assert purposes.status_code == 400 and purposes.json()["error"]["param"] == "purpose"
        filters = http.get("/v1/fine_tuning/jobs?metadata[team]=x&metadata[team]=y", headers=auth)
        assert filters.status_code == 400 and filters.json()["error"]["param"] == "metadata"


def test_a_file_sent_without_a_filename_is_named_as_the_problem(  # type: ignore[no-untyped-def]
    api_server: RunningApi, make_tenant
) -> None:
    from tests import sample_data

    key = make_tenant().api_key
    response = httpx.post(
        f"{api_server.base_url}/v1/files",
        files=[("purpose", (None, b"fine-tune")), ("file", ("", sample_data.chat_jsonl()))],
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file" and "filename" in error["message"]


def _duplicate(response: httpx.Response, param: str, code: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    message: str = error["message"]
    return message


def test_a_key_given_twice_in_a_json_body_is_refused(  # type: ignore[no-untyped-def]
    api_server: RunningApi, make_tenant
) -> None:
    from tests import sample_data

    key = make_tenant().api_key
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        file_id = http.post(
            "/v1/files",
            files={"file": ("t.jsonl", sample_data.chat_jsonl())},
            data={"purpose": "fine-tune"},
        ).json()["id"]
        http.headers["content-type"] = "application/json"  # the bodies below are written out
        job = f'"model": "tiny-llama", "training_file": "{file_id}"'
        for body, param, where in (
            (f'{{{job}, "suffix": "a", "suffix": "b"}}', "suffix", ""),
            (
                f'{{{job}, "hyperparameters": {{"n_epochs": 1, "n_epochs": 3}}}}',
                "hyperparameters.n_epochs",
                " at hyperparameters:",
            ),
            (
                f'{{{job}, "method": {{"type": "supervised", "supervised": '
                '{"hyperparameters": {"batch_size": 1, "batch_size": 2}}}}',
                "method.supervised.hyperparameters.batch_size",
                " at method.supervised.hyperparameters:",
            ),
            (f'{{{job}, "metadata": {{"x": "1", "x": "2"}}}}', "metadata.x", " at metadata:"),
        ):
            message = _duplicate(
                http.post("/v1/fine_tuning/jobs", content=body), param, "duplicate_key"
            )
            assert f"'{param.rsplit('.', 1)[-1]}'" in message and where in message, message
        # Nothing was created by the refused bodies; the same job said once is accepted.
        assert http.get("/v1/fine_tuning/jobs").json()["data"] == []
        created = http.post("/v1/fine_tuning/jobs", content=f'{{{job}, "metadata": {{"x": "1"}}}}')
        assert created.status_code == 200, created.text
        assert created.json()["metadata"] == {"x": "1"}

        # Webhook endpoints: create and update alike.
        url = "https://93.184.216.34/hook"
        twice = f'{{"url": "{url}", "url": "https://93.184.216.35/hook"}}'
        _duplicate(http.post("/v1/webhook_endpoints", content=twice), "url", "duplicate_key")
        endpoint = http.post("/v1/webhook_endpoints", content=f'{{"url": "{url}"}}').json()
        update = '{"enabled": false, "description": "a", "enabled": true}'
        path = f"/v1/webhook_endpoints/{endpoint['id']}"
        _duplicate(http.post(path, content=update), "enabled", "duplicate_key")
        assert http.get(path).json()["enabled"] is True


def test_a_query_parameter_given_twice_is_refused(  # type: ignore[no-untyped-def]
    api_server: RunningApi, make_tenant
) -> None:
    key = make_tenant().api_key
    with httpx.Client(
        base_url=api_server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as http:
        for query, param in (
            ("limit=1&limit=50", "limit"),
            (
                "after=ftjob-01jd0000000000000000000000&limit=5&after=ftjob-01jd0000000000000000000001",
                "after",
            ),
            ("limit=5&l%69mit=5", "limit"),  # the same name once decoded, even with one value
        ):
            message = _duplicate(
                http.get(f"/v1/fine_tuning/jobs?{query}"), param, "duplicate_parameter"
            )
            assert f"'{param}'" in message
        _duplicate(http.get("/v1/files?order=asc&order=desc"), "order", "duplicate_parameter")
        _duplicate(
            http.get("/v1/webhook_endpoints?limit=2&limit=3"), "limit", "duplicate_parameter"
        )
        # Repeated filter keys keep their own wording; different keys are two filters.
        message = _duplicate(
            http.get("/v1/fine_tuning/jobs?metadata[team]=x&metadata[team]=y"),
            "metadata",
            "duplicate_parameter",
        )
        assert "'team'" in message
        both = http.get("/v1/fine_tuning/jobs?metadata[team]=x&metadata[env]=y&limit=5")
        assert both.status_code == 200 and both.json()["data"] == []
        assert http.get("/v1/files?order=asc&limit=5").status_code == 200
        # The rule is the JSON API's: the dashboard's pages are not under it.
        assert http.get("/admin/login?next=/admin&next=/admin/jobs").status_code == 200

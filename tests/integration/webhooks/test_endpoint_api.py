"""/v1/webhook_endpoints on Postgres: bad input is a 400 naming the field (never a 500 from the
database, never a silent coercion), and every POST honours Idempotency-Key."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_SECRET, RunningApi, TenantCreds

# A global IP literal: accepted without DNS and without the SSRF allow list.
URL = "https://93.184.216.34/hook"
E = "/webhook_endpoints"


@pytest.fixture
def http(api_server: RunningApi, make_tenant: Callable[..., TenantCreds]) -> Iterator[httpx.Client]:
    tenant = make_tenant()
    with httpx.Client(
        base_url=f"{api_server.base_url}/v1",
        headers={"Authorization": f"Bearer {tenant.api_key}"},
        timeout=30,
    ) as client:
        yield client


def _create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post(E, json={"url": URL, **body})
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def _refused(response: httpx.Response, param: str, code: str = "invalid_request") -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error
    message: str = error["message"]
    return message


# --- free text that Postgres cannot store ------------------------------------------------------


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "a\ud800b"], ids=["nul", "only-nul", "lone"])
def test_a_description_postgres_cannot_store_is_a_400(http: httpx.Client, text: str) -> None:
    body = json.dumps({"url": URL, "description": text})  # "\u0000", "\ud800" escapes
    _refused(
        http.post(E, content=body, headers={"content-type": "application/json"}), "description"
    )
    endpoint = _create(http, description="kept")
    update = json.dumps({"description": text})
    response = http.post(
        f"{E}/{endpoint['id']}", content=update, headers={"content-type": "application/json"}
    )
    _refused(response, "description")
    assert http.get(f"{E}/{endpoint['id']}").json()["description"] == "kept"
    assert len(http.get(E).json()["data"]) == 1


def test_a_url_postgres_cannot_store_is_a_400(http: httpx.Client) -> None:
    endpoint = _create(http)
    for url in (URL + "\x00", URL + "\ud800"):
        body = json.dumps({"url": url})
        for path in (E, f"{E}/{endpoint['id']}"):
            response = http.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "url"


# --- a URL that normalising lengthens past the column ------------------------------------------


def test_a_url_too_long_once_normalised_is_refused(http: httpx.Client) -> None:
    # 2048 characters as sent; 2053 once 1.1 is written 1.0.0.1 and "?" becomes "/?".
    url = "https://1.1?" + "a" * (2048 - 12)
    message = _refused(http.post(E, json={"url": url}), "url", "invalid_url")
    assert "2053 characters long once normalised" in message
    endpoint = _create(http)
    _refused(http.post(f"{E}/{endpoint['id']}", json={"url": url}), "url", "invalid_url")
    assert http.get(f"{E}/{endpoint['id']}").json()["url"] == URL

    # At the limit once normalised: accepted and stored as it is.
    longest = "https://1.1?" + "a" * (2048 - 17)
    assert _create(http, url=longest)["url"] == "https://1.0.0.1/?" + "a" * (2048 - 17)


# --- strict JSON types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"enabled": "no"}, "enabled"),
        ({"enabled": 0}, "enabled"),
        ({"enabled": "false"}, "enabled"),
        ({"description": 5}, "description"),
        ({"events": "fine_tuning.job.succeeded"}, "events"),
        ({"url": 5}, "url"),
    ],
)
def test_update_refuses_wrong_json_types(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    endpoint = _create(http)
    _refused(http.post(f"{E}/{endpoint['id']}", json=body), param)
    shown = http.get(f"{E}/{endpoint['id']}").json()
    assert shown["enabled"] is True and shown["url"] == URL and shown["description"] == ""


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": URL, "description": 1}, "description"),
        ({"url": URL, "events": [1]}, "events[0]"),
        ({"url": [URL]}, "url"),
    ],
)
def test_create_refuses_wrong_json_types(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    _refused(http.post(E, json=body), param)
    assert http.get(E).json()["data"] == []


@pytest.mark.parametrize("overlap", ["5", 5.0, True, None])
def test_rotate_refuses_a_non_integer_overlap(http: httpx.Client, overlap: Any) -> None:
    endpoint = _create(http)
    response = http.post(f"{E}/{endpoint['id']}/rotate_secret", json={"overlap_seconds": overlap})
    _refused(response, "overlap_seconds")


def test_values_of_the_right_type_still_work(http: httpx.Client) -> None:
    endpoint = _create(http, events=["fine_tuning.job.succeeded"], description="mine")
    assert endpoint["events"] == ["fine_tuning.job.succeeded"]
    disabled = http.post(f"{E}/{endpoint['id']}", json={"enabled": False, "description": "off"})
    assert disabled.status_code == 200, disabled.text
    assert (disabled.json()["enabled"], disabled.json()["description"]) == (False, "off")
    assert http.post(f"{E}/{endpoint['id']}", json={"enabled": True}).json()["enabled"] is True
    rotated = http.post(f"{E}/{endpoint['id']}/rotate_secret", json={"overlap_seconds": 5})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secret"] != endpoint["secret"]
    assert http.post(f"{E}/{endpoint['id']}/rotate_secret").status_code == 200  # no body


# --- Idempotency-Key ---------------------------------------------------------------------------


def _post(http: httpx.Client, path: str, key: str, body: Any = None) -> httpx.Response:
    if body is None:  # no body at all
        return http.post(path, headers={"Idempotency-Key": key})
    return http.post(path, json=body, headers={"Idempotency-Key": key})


def _replayed(first: httpx.Response, second: httpx.Response) -> None:
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()


def _reused(response: httpx.Response) -> None:
    _refused(response, "Idempotency-Key", "idempotency_key_reused")


def test_create_with_a_key_makes_one_endpoint(http: httpx.Client) -> None:
    first = _post(http, E, "create-1", {"url": URL, "description": "once"})
    second = _post(http, E, "create-1", {"url": URL, "description": "once"})
    _replayed(first, second)
    assert second.json()["secret"].startswith("whsec_")  # the secret, shown again to the retry
    _reused(_post(http, E, "create-1", {"url": URL, "description": "twice"}))
    assert [e["id"] for e in http.get(E).json()["data"]] == [first.json()["id"]]


def test_update_enable_disable_with_a_key_replay_the_first_answer(http: httpx.Client) -> None:
    endpoint = _create(http)
    path = f"{E}/{endpoint['id']}"
    first = _post(http, path, "upd-1", {"description": "a"})
    assert http.post(path, json={"description": "b"}).status_code == 200
    _replayed(first, _post(http, path, "upd-1", {"description": "a"}))
    assert http.get(path).json()["description"] == "b"  # the retry did not write "a" again
    _reused(_post(http, path, "upd-1", {"description": "c"}))

    disabled = _post(http, f"{path}/disable", "off-1")
    assert disabled.json()["enabled"] is False
    assert http.post(f"{path}/enable").json()["enabled"] is True
    _replayed(disabled, _post(http, f"{path}/disable", "off-1"))
    assert http.get(path).json()["enabled"] is True  # replayed, not disabled again
    _reused(_post(http, f"{path}/enable", "off-1"))  # the same key on another action


def _secrets(api_server: RunningApi, endpoint_id: str) -> tuple[str, str | None]:
    from common.webhooks.signing import decrypt_secret
    from models_db.models import WebhookEndpoint

    with api_server.session_factory() as session:  # type: ignore[operator]
        row = session.get(WebhookEndpoint, endpoint_id)
        previous = row.previous_secret_encrypted
        return decrypt_secret(TEST_SECRET, row.secret_encrypted), (
            decrypt_secret(TEST_SECRET, previous) if previous else None
        )


def test_a_retried_rotation_rotates_once(http: httpx.Client, api_server: RunningApi) -> None:
    endpoint = _create(http)
    path = f"{E}/{endpoint['id']}/rotate_secret"

    def rotate(_: int) -> httpx.Response:
        return _post(http, path, "rot-1", {"overlap_seconds": 60})

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(rotate, range(8)))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    assert len({r.json()["secret"] for r in answers}) == 1
    assert sum(1 for r in answers if "idempotent-replayed" not in r.headers) == 1
    rotated = answers[0].json()["secret"]
    # Rotated exactly once: the previous secret is the original one, not an intermediate one.
    assert _secrets(api_server, endpoint["id"]) == (rotated, endpoint["secret"])
    _reused(_post(http, path, "rot-1", {"overlap_seconds": 61}))

    # No body and the default body are the same request.
    first = _post(http, path, "rot-2")
    _replayed(first, _post(http, path, "rot-2", {"overlap_seconds": 86400}))
    assert _secrets(api_server, endpoint["id"]) == (first.json()["secret"], rotated)


def test_the_stored_answer_keeps_no_secret_in_clear(
    http: httpx.Client, api_server: RunningApi
) -> None:
    from sqlalchemy import select

    from models_db.models import IdempotencyKey

    created = _post(http, E, "sealed-create", {"url": URL}).json()
    rotated = _post(http, f"{E}/{created['id']}/rotate_secret", "sealed-rotate").json()
    with api_server.session_factory() as session:  # type: ignore[operator]
        rows = session.scalars(
            select(IdempotencyKey.response).where(
                IdempotencyKey.key.in_(["sealed-create", "sealed-rotate"])
            )
        ).all()
    stored = [r for r in rows if r["id"] == created["id"]]
    assert len(stored) == 2
    text = json.dumps(stored)
    assert created["secret"] not in text and rotated["secret"] not in text
    assert "whsec_" not in text


def test_test_event_and_replay_with_a_key_happen_once(
    http: httpx.Client, api_server: RunningApi
) -> None:
    from sqlalchemy import func, select

    from models_db.models import AuditLogEntry

    endpoint = _create(http)
    path = f"{E}/{endpoint['id']}"
    first = _post(http, f"{path}/test", "test-1")
    _replayed(first, _post(http, f"{path}/test", "test-1"))
    deliveries = http.get(f"{path}/deliveries").json()["data"]
    assert [d["id"] for d in deliveries] == [first.json()["id"]]

    replay_path = f"{path}/deliveries/{first.json()['id']}/replay"
    replayed = _post(http, replay_path, "replay-1")
    _replayed(replayed, _post(http, replay_path, "replay-1"))
    _reused(_post(http, f"{path}/test", "replay-1"))
    with api_server.session_factory() as session:  # type: ignore[operator]
        replays = session.scalar(
            select(func.count()).where(
                AuditLogEntry.action == "webhook_delivery.replay",
                AuditLogEntry.target_id == first.json()["id"],
            )
        )
    assert replays == 1


def test_a_request_that_fails_leaves_the_key_free(http: httpx.Client) -> None:
    # As for jobs: an error is not stored; the same key with a corrected request does the work.
    refused = _post(http, E, "fix-1", {"url": "https://127.0.0.1/hook"})
    _refused(refused, "url", "invalid_url")
    created = _post(http, E, "fix-1", {"url": URL})
    assert created.status_code == 200 and "idempotent-replayed" not in created.headers


# --- the endpoint cap ----------------------------------------------------------------------------


def test_the_endpoint_cap_holds_against_concurrent_creates(http: httpx.Client) -> None:
    for _ in range(18):
        _create(http)
    # Two creates at once for the last two places, then two more: exactly 20 in the end.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: http.post(E, json={"url": URL}), range(4)))
    assert sorted(a.status_code for a in answers) == [200, 200, 400, 400], [a.text for a in answers]
    for refused in (a for a in answers if a.status_code == 400):
        assert refused.json()["error"]["code"] == "too_many_endpoints"
    assert len(http.get(E, params={"limit": 100}).json()["data"]) == 20

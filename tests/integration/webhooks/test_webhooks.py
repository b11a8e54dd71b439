"""Webhooks end to end: real Postgres, Redis, Celery workers and an HTTP receiver on loopback.

Signatures are checked with the official ``standardwebhooks`` library and the ``openai`` SDK.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from openai import OpenAI

from tests import sample_data
from tests.conftest import TenantCreds
from tests.fixtures.webhook_receiver import Receiver
from tests.integration.conftest import TrainingStack, wait_for, wait_status

ALL_JOB_EVENTS = [
    "fine_tuning.job.cancelled",
    "fine_tuning.job.failed",
    "fine_tuning.job.succeeded",
]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


def _api(stack: TrainingStack, tenant: TenantCreds, method: str, path: str, **kw: Any) -> Any:
    response = httpx.request(
        method,
        f"{stack.api.base_url}/v1{path}",
        headers={"Authorization": f"Bearer {tenant.api_key}"},
        timeout=30,
        **kw,
    )
    assert response.status_code < 300, response.text
    return response.json()


def _endpoint(
    stack: TrainingStack, tenant: TenantCreds, url: str, events: list[str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"url": url}
    if events is not None:
        body["events"] = events
    created: dict[str, Any] = _api(stack, tenant, "POST", "/webhook_endpoints", json=body)
    assert created["secret"].startswith("whsec_")
    return created


def _verify(secret: str, received: Any) -> dict[str, Any]:
    """Both official verifiers accept the delivery; returns the payload."""
    payload: dict[str, Any] = standardwebhooks.Webhook(secret).verify(
        received.body.decode(), received.headers
    )
    OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(
        received.body.decode(), received.headers
    )
    return payload


def _events_for(receiver: Receiver, path: str = "/hook") -> list[Any]:
    with receiver.lock:
        return [r for r in receiver.requests if r.path == path]


def test_job_outcomes_produce_one_signed_event_per_subscribed_endpoint(
    stack: TrainingStack,
    tenant: TenantCreds,
    receiver: Receiver,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    from api.catalog.service import register_base_model
    from models_db.session import transaction

    everything = _endpoint(stack, tenant, receiver.url)
    only_success = _endpoint(
        stack, tenant, receiver.url.replace("/hook", "/success"), ["fine_tuning.job.succeeded"]
    )
    client = OpenAI(base_url=stack.api.openai_base_url, api_key=tenant.api_key, max_retries=0)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(sample_data.chat_jsonl(12))), purpose="fine-tune"
    ).id
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}

    # Cancelled before any worker runs: the API ends it, in the same transaction as the event.
    cancelled = client.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id)
    client.fine_tuning.jobs.cancel(cancelled.id)

    # Fails: weights missing, every attempt crashes.
    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_model_dir, broken)
    with transaction(stack.api.session_factory) as session:  # type: ignore[arg-type]
        register_base_model(session, "broken-llama-wh", str(broken))
    (broken / "model.safetensors").unlink()
    failed = client.fine_tuning.jobs.create(
        model="broken-llama-wh",
        training_file=file_id,
        method=method,  # type: ignore[arg-type]
    )
    succeeded = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        method=method,  # type: ignore[arg-type]
    )
    stack.start_worker("w-hooks")
    for job, status in ((failed, "failed"), (succeeded, "succeeded")):
        final = wait_status(stack, tenant.api_key, job.id, {"succeeded", "failed"}, 300)
        assert final["status"] == status, (final, stack.worker_log("w-hooks"))

    wait_for(lambda: len(_events_for(receiver)) >= 3, 30, "three events")
    wait_for(lambda: len(_events_for(receiver, "/success")) >= 1, 30, "the success event")
    time.sleep(1.0)  # anything extra would arrive now
    seen = {}
    for received in _events_for(receiver):
        payload = _verify(everything["secret"], received)
        seen[payload["data"]["id"]] = payload["type"]
        assert payload["object"] == "event" and payload["id"] == received.headers["webhook-id"]
    assert seen == {
        cancelled.id: "fine_tuning.job.cancelled",
        failed.id: "fine_tuning.job.failed",
        succeeded.id: "fine_tuning.job.succeeded",
    }
    assert len(_events_for(receiver)) == 3  # exactly one each
    (success_only,) = _events_for(receiver, "/success")
    payload = _verify(only_success["secret"], success_only)
    assert payload["data"]["id"] == succeeded.id
    assert payload["data"]["fine_tuned_model"].startswith("ft:tiny-llama:")

    # Tampering and replays of old messages fail both verifiers.
    original = _events_for(receiver)[0]
    tampered = original.body.replace(b'"event"', b'"evenT"')
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(everything["secret"]).verify(tampered.decode(), original.headers)
    old = {**original.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(everything["secret"]).verify(original.body.decode(), old)
    with pytest.raises(Exception, match=r"(?i)signature|timestamp|old"):
        OpenAI(api_key="x", webhook_secret=everything["secret"]).webhooks.unwrap(
            tampered.decode(), original.headers
        )

    # Every attempt is recorded and listed; a delivery can be replayed.
    deliveries = _api(stack, tenant, "GET", f"/webhook_endpoints/{everything['id']}/deliveries")
    assert {d["status"] for d in deliveries["data"]} == {"succeeded"}
    assert all(d["attempt_log"][-1]["status_code"] == 200 for d in deliveries["data"])
    first = deliveries["data"][0]
    _api(
        stack,
        tenant,
        "POST",
        f"/webhook_endpoints/{everything['id']}/deliveries/{first['id']}/replay",
    )
    wait_for(lambda: len(_events_for(receiver)) >= 4, 15, "the replayed delivery")
    assert _events_for(receiver)[-1].headers["webhook-id"] == first["event_id"]


def _emit_many(stack: TrainingStack, tenant: TenantCreds, count: int) -> None:
    from common.webhooks.events import emit_event
    from models_db.session import transaction

    with transaction(stack.api.session_factory) as session:  # type: ignore[arg-type]
        for i in range(count):
            emit_event(
                session,
                tenant.tenant_id,
                "fine_tuning.job.succeeded",
                {"id": f"ftjob-load-{i}", "object": "fine_tuning.job"},
            )


def test_a_thousand_events_to_a_flaky_receiver_are_all_delivered_once(
    stack: TrainingStack, tenant: TenantCreds
) -> None:
    flaky = Receiver(failure_rate=0.3).start()
    try:
        _endpoint(stack, tenant, flaky.url)
        _emit_many(stack, tenant, 1000)
        stack.start_worker("w-flaky")
        wait_for(lambda: len(flaky.accepted) >= 1000, 240, "1000 accepted events", 1.0)
        time.sleep(1.0)
        assert len(flaky.accepted) == 1000
        assert not flaky.duplicates, flaky.duplicates.most_common(3)
        failures = sum(1 for r in flaky.requests) - 1000
        assert failures > 200  # the receiver really failed ~30% of attempts
    finally:
        flaky.stop()


def test_worker_killed_mid_delivery_retries_and_delivers(
    stack: TrainingStack, tenant: TenantCreds
) -> None:
    # Held past the lease (LORAPLEX_WEBHOOK_LEASE_SECONDS, 8 s here): the retry comes first.
    slow = Receiver(hang_first_seconds=30).start()
    try:
        _endpoint(stack, tenant, slow.url)
        doomed = stack.start_worker("w-doomed")
        _emit_many(stack, tenant, 1)
        wait_for(lambda: slow.requests, 30, "the first attempt to arrive")
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        stack.start_worker("w-rescue")
        wait_for(lambda: slow.accepted, 60, "the event to be delivered after the kill")
        ids = slow.ids()
        assert len(ids) >= 2 and len(set(ids)) == 1  # the same webhook-id, retried
    finally:
        slow.stop()


def test_secret_rotation_overlap(
    stack: TrainingStack, tenant: TenantCreds, receiver: Receiver
) -> None:
    endpoint = _endpoint(stack, tenant, receiver.url)
    old_secret = endpoint["secret"]
    rotate = f"/webhook_endpoints/{endpoint['id']}/rotate_secret"
    # An overlap far longer than the delivery can take, however busy the machine.
    rotated = _api(stack, tenant, "POST", rotate, json={"overlap_seconds": 600})
    new_secret = rotated["secret"]
    assert new_secret != old_secret and rotated["previous_secret_expires_at"]
    stack.start_worker("w-rotate")
    _api(stack, tenant, "POST", f"/webhook_endpoints/{endpoint['id']}/test")
    wait_for(lambda: len(receiver.requests) >= 1, 30, "the test event")
    during = receiver.requests[0]
    assert len(during.headers["webhook-signature"].split()) == 2
    _verify(old_secret, during)
    _verify(new_secret, during)

    # Rotating again without overlap: only the newest secret signs; the one before it, which
    # was current a moment ago, no longer verifies.
    newest = _api(stack, tenant, "POST", rotate, json={"overlap_seconds": 0})["secret"]
    _api(stack, tenant, "POST", f"/webhook_endpoints/{endpoint['id']}/test")
    wait_for(lambda: len(receiver.requests) >= 2, 30, "the second test event")
    after = receiver.requests[1]
    assert len(after.headers["webhook-signature"].split()) == 1
    assert _verify(newest, after)["type"] == "webhook_endpoint.test"
    for retired in (new_secret, old_secret):
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(retired).verify(after.body.decode(), after.headers)


def test_410_disables_the_endpoint_and_says_why(stack: TrainingStack, tenant: TenantCreds) -> None:
    gone = Receiver(status=410).start()
    try:
        endpoint = _endpoint(stack, tenant, gone.url)
        stack.start_worker("w-gone")
        _emit_many(stack, tenant, 1)
        wait_for(
            lambda: (
                not _api(stack, tenant, "GET", f"/webhook_endpoints/{endpoint['id']}")["enabled"]
            ),
            30,
            "the endpoint to be disabled",
        )
        shown = _api(stack, tenant, "GET", f"/webhook_endpoints/{endpoint['id']}")
        assert "410" in shown["disabled_reason"]
        assert len(gone.requests) == 1  # no retry after 410
    finally:
        gone.stop()

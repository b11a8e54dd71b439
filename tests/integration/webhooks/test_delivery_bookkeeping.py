"""The delivery bookkeeping on a real database (Postgres, and SQLite where locking differs):
who claims a delivery, which events an endpoint gets while disabled, when an endpoint counts
as failing, and how many deliveries one sender holds at a time."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.webhooks.service import set_enabled
from common import ids
from common.webhooks import signing
from common.webhooks.events import PARKED_AT_MS, emit_event, enqueue_delivery
from common.webhooks.ssrf import DeliveryResult
from models_db.base import now_ts
from models_db.models import Tenant, WebhookDelivery, WebhookEndpoint
from models_db.session import make_engine, make_session_factory, transaction
from workers.settings import WorkerSettings
from workers.webhooks import delivery as delivery_module
from workers.webhooks.delivery import DueDelivery, WebhookSender, claim_due, record

EVENT = "fine_tuning.job.succeeded"
FAILED = DeliveryResult(503, 1.0, "busy", "503 Service Unavailable", False)


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, fresh_database: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        import migrations

        url = f"sqlite:///{tmp_path / 'embedded.db'}"
        migrations.upgrade(url)
        return url
    return str(fresh_database(migrate=True))


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        data_dir=tmp_path,
        secret_key="test-secret-key-" + "x" * 24,
        webhook_concurrency=2,
        webhook_lease_seconds=60,
        webhook_timeout_seconds=15,
    )


@pytest.fixture
def factory(settings: WorkerSettings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


def _endpoint(factory: sessionmaker[Session], settings: WorkerSettings) -> str:
    with transaction(factory) as session:
        slug = "w-" + secrets.token_hex(4)
        tenant = Tenant(id=ids.new_id(ids.TENANT), name=slug, slug=slug)
        session.add(tenant)
        session.flush()
        endpoint = WebhookEndpoint(
            id=ids.new_id(ids.WEBHOOK_ENDPOINT),
            tenant_id=tenant.id,
            url="https://hooks.example/jobs",
            events=[EVENT],
            secret_encrypted=signing.encrypt_secret(settings.secret_key, signing.generate_secret()),
        )
        session.add(endpoint)
        return endpoint.id


def _deliveries(factory: sessionmaker[Session], endpoint_id: str, n: int) -> list[str]:
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        made = [
            enqueue_delivery(session, endpoint, ids.new_id(ids.WEBHOOK_EVENT), EVENT, "{}")
            for _ in range(n)
        ]
        session.flush()
        return [d.id for d in made]


def _disabled_by_us(factory: sessionmaker[Session], settings: WorkerSettings) -> str:
    """An endpoint that the sender disabled (it answered 410), not its tenant."""
    endpoint_id = _endpoint(factory, settings)
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        endpoint.enabled = False
        endpoint.disabled_reason = "The endpoint answered 410 Gone; deliveries stopped."
    return endpoint_id


def _emit(factory: sessionmaker[Session], endpoint_id: str) -> int:
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        return emit_event(session, endpoint.tenant_id, EVENT, {"id": "ftjob-x"})


def test_two_claimers_never_hold_the_same_delivery(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    """The wake-up task and the sender thread of one process claim concurrently; on SQLite
    (no row locks) the second must wait for the first and then find nothing due."""
    [delivery_id] = _deliveries(factory, _endpoint(factory, settings), 1)
    first = factory()
    try:
        mine = claim_due(first, settings)
        assert [d.id for d in mine] == [delivery_id]
        theirs: list[DueDelivery] = []

        def other() -> None:
            with transaction(factory) as session:
                theirs.extend(claim_due(session, settings))

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)  # the other claimer is waiting for, or skipping, our lock
        first.commit()
    finally:
        first.close()
    thread.join(30)
    assert not thread.is_alive()
    assert theirs == []


def test_an_endpoint_we_disabled_keeps_its_events_for_when_it_is_enabled(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    endpoint_id = _disabled_by_us(factory, settings)
    assert _emit(factory, endpoint_id) == 1  # kept, not dropped
    with transaction(factory) as session:
        assert claim_due(session, settings) == []  # but not sent while disabled
        [parked] = session.scalars(select(WebhookDelivery)).all()
        assert parked.next_attempt_at_ms == PARKED_AT_MS  # out of the senders' way
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        set_enabled(session, endpoint, True)
    with transaction(factory) as session:
        assert len(claim_due(session, settings)) == 1
    # One the tenant disabled itself gets nothing.
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        set_enabled(session, endpoint, False)
    assert _emit(factory, endpoint_id) == 0


def test_a_410_parks_the_endpoint_s_other_deliveries_until_it_is_enabled(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    endpoint_id = _endpoint(factory, settings)
    gone, waiting = _deliveries(factory, endpoint_id, 2)
    with transaction(factory) as session:
        [due] = claim_due(session, settings, only_id=gone)
    with transaction(factory) as session:
        record(session, settings, due, DeliveryResult(410, 1.0, "", "410 Gone", False))
    with transaction(factory) as session:
        row = session.get(WebhookDelivery, waiting)
        assert row is not None and row.status == "pending"
        assert row.next_attempt_at_ms == PARKED_AT_MS
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None and not endpoint.enabled
        set_enabled(session, endpoint, True)
    with transaction(factory) as session:
        assert [d.id for d in claim_due(session, settings)] == [waiting]


def _fail_once(factory: sessionmaker[Session], settings: WorkerSettings, delivery_id: str) -> None:
    with transaction(factory) as session:
        [due] = claim_due(session, settings, only_id=delivery_id)
    with transaction(factory) as session:
        record(session, settings, due, FAILED)


def test_a_failure_long_after_the_last_streak_does_not_disable_the_endpoint(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    endpoint_id = _endpoint(factory, settings)
    long_ago = now_ts() - 10 * 24 * 3600
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        endpoint.failing_since = long_ago  # a streak that ended in exhausted retries
    [delivery_id] = _deliveries(factory, endpoint_id, 1)
    _fail_once(factory, settings, delivery_id)
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        assert endpoint.enabled, endpoint.disabled_reason
        assert endpoint.failing_since is not None and endpoint.failing_since > long_ago


def test_a_streak_still_going_disables_the_endpoint(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    endpoint_id = _endpoint(factory, settings)
    older, newer = _deliveries(factory, endpoint_id, 2)
    _fail_once(factory, settings, older)  # still being retried
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        endpoint.failing_since = now_ts() - settings.webhook_disable_after_seconds - 1
    _fail_once(factory, settings, newer)
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        assert not endpoint.enabled
        assert (endpoint.disabled_reason or "").startswith("Every delivery has failed")


def test_a_sender_claims_no_more_than_it_can_send_at_once(
    factory: sessionmaker[Session], settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claiming a backlog beyond the free threads would start leases for sends that wait
    their turn; past the lease another worker would send them again."""
    _deliveries(factory, _endpoint(factory, settings), 5)
    release = threading.Event()
    sent: list[str] = []

    def slow_deliver(*args: Any) -> bool:
        sent.append(args[-1].id)
        release.wait(30)
        return True

    monkeypatch.setattr(delivery_module, "deliver", slow_deliver)
    sender = WebhookSender(factory, settings)
    try:
        assert sender.claim_and_send() == 2  # webhook_concurrency
        assert sender.claim_and_send() == 0  # both threads busy: nothing more is leased
        with transaction(factory) as session:
            leased = session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.attempts > 0)
            ).all()
        assert len(leased) == 2
        release.set()  # the two sends return and their threads come free
        deadline = time.monotonic() + 30
        while len(sent) < 5 and time.monotonic() < deadline:
            sender.claim_and_send()
            time.sleep(0.05)
        assert sorted(sent) == sorted(set(sent)) and len(sent) == 5  # each sent once
    finally:
        release.set()
        sender.stop()


def test_a_410_and_another_result_recorded_at_once_do_not_deadlock(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    """Disabling the endpoint (a 410) parks its other deliveries while another send of the same
    endpoint is being recorded: both take the endpoint's lock before any delivery's."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite takes one write lock for the whole database")
    endpoint_id = _endpoint(factory, settings)
    gone_id, other_id = _deliveries(factory, endpoint_id, 2)
    with transaction(factory) as session:
        due = {d.id: d for d in claim_due(session, settings)}
    outcome: dict[str, str] = {}

    def record_slowly() -> None:
        # The other result's first lock is held for a while before its second is taken.
        session = factory()
        real_get = session.get
        calls = 0

        def slow_get(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            found = real_get(*args, **kwargs)
            calls += 1
            if calls == 1:
                time.sleep(1.0)
            return found

        session.get = slow_get  # type: ignore[method-assign]
        try:
            record(session, settings, due[other_id], FAILED)
            session.commit()
            outcome["other"] = "committed"
        except Exception as exc:
            outcome["other"] = repr(exc)
        finally:
            session.close()

    slow = threading.Thread(target=record_slowly)
    slow.start()
    time.sleep(0.3)
    try:
        with transaction(factory) as session:
            record(session, settings, due[gone_id], DeliveryResult(410, 1.0, "", "Gone", False))
        outcome["gone"] = "committed"
    except Exception as exc:
        outcome["gone"] = repr(exc)
    slow.join(30)
    assert outcome == {"gone": "committed", "other": "committed"}


def test_a_tenant_can_turn_off_an_endpoint_we_had_disabled(
    factory: sessionmaker[Session], settings: WorkerSettings
) -> None:
    endpoint_id = _disabled_by_us(factory, settings)
    with transaction(factory) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        set_enabled(session, endpoint, False)  # the tenant's own "off"
    assert _emit(factory, endpoint_id) == 0  # events are no longer kept for it

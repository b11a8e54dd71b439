"""Sending webhook deliveries: claim what is due, sign, send safely, record, reschedule.

A delivery is claimed by pushing its due time one lease ahead (in the claiming transaction, rows
locked with SKIP LOCKED on Postgres), so a worker that dies mid-send leaves a delivery that
becomes due again when the lease ends: at-least-once, never lost. Receivers deduplicate on
``webhook-id`` (the event id), which is the same on every attempt.

After a failure the next attempt waits for the next step of the retry schedule (about three
days in all by default) with ±20 % jitter; past the last step the delivery has failed. A 410
Gone disables the endpoint at once; an endpoint whose deliveries have failed for longer than
``webhook_disable_after_seconds`` is disabled too, with the reason shown to the tenant.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.webhooks.events import PARKED_AT_MS, set_parked
from common.webhooks.signing import decrypt_secret, headers
from common.webhooks.ssrf import DeliveryResult, SafeWebhookClient
from models_db.base import now_ms, now_ts
from models_db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from models_db.session import transaction
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

_EXCERPT_CHARS = 1000


@dataclass(frozen=True)
class DueDelivery:
    id: str
    endpoint_id: str
    url: str
    event_id: str
    body: str
    secrets: list[str]
    attempt: int


def live_secrets(endpoint: WebhookEndpoint, server_secret: str, now: int) -> list[str]:
    secrets = [decrypt_secret(server_secret, endpoint.secret_encrypted)]
    if (
        endpoint.previous_secret_encrypted
        and endpoint.previous_secret_expires_at is not None
        and endpoint.previous_secret_expires_at > now
    ):
        secrets.append(decrypt_secret(server_secret, endpoint.previous_secret_encrypted))
    return secrets


def claim_due(
    session: Session,
    settings: WorkerSettings,
    *,
    limit: int = 50,
    only_id: str | None = None,
) -> list[DueDelivery]:
    """Take deliveries that are due (optionally just one), pushing each a lease ahead."""
    current = now_ms()
    stmt = (
        select(WebhookDelivery, WebhookEndpoint)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at_ms <= current,
            WebhookEndpoint.enabled.is_(True),
            WebhookEndpoint.deleted_at.is_(None),
        )
        .order_by(WebhookDelivery.next_attempt_at_ms)
        .limit(limit)
    )
    if only_id is not None:
        stmt = stmt.where(WebhookDelivery.id == only_id)
    # Postgres: rows another sender holds are skipped. SQLite (no row locks): the write lock
    # is taken before the read (models_db.session), so two senders in one process (the wake-up
    # task and the sender thread) cannot both claim a delivery.
    stmt = stmt.with_for_update(skip_locked=True, of=WebhookDelivery)
    claimed = []
    lease_ms = int(settings.webhook_lease_seconds * 1000)
    for delivery, endpoint in session.execute(stmt).all():
        delivery.attempts += 1
        delivery.next_attempt_at_ms = current + lease_ms
        try:
            secrets = live_secrets(endpoint, settings.secret_key, now_ts())
        except (ValueError, InvalidTag):
            # Encrypted under another server secret (a rotation gone wrong): never send it
            # unsigned; it is retried after the lease, and the error is visible in the logs.
            log.error("webhook endpoint %s: its secret cannot be decrypted", endpoint.id)
            continue
        claimed.append(
            DueDelivery(
                id=delivery.id,
                endpoint_id=endpoint.id,
                url=endpoint.url,
                event_id=delivery.event_id,
                body=delivery.body,
                secrets=secrets,
                attempt=delivery.attempts,
            )
        )
    return claimed


def send(client: SafeWebhookClient, due: DueDelivery) -> DeliveryResult:
    body = due.body.encode()
    signed = headers(due.secrets, due.event_id, now_ts(), body)
    signed["content-type"] = "application/json"
    signed["user-agent"] = "loraplex-webhooks/1"
    return client.post(due.url, body, signed)


def retry_delay_seconds(schedule: list[float], attempt: int) -> float | None:
    """Wait before attempt ``attempt + 1``; None once the schedule is used up."""
    if attempt > len(schedule):
        return None
    return schedule[attempt - 1] * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrets


def record(
    session: Session, settings: WorkerSettings, due: DueDelivery, result: DeliveryResult
) -> None:
    # Endpoint first, then its deliveries: the order every path that changes both takes
    # (disabling an endpoint parks its deliveries), so that two of them cannot deadlock.
    endpoint = session.get(WebhookEndpoint, due.endpoint_id, with_for_update=True)
    delivery = session.get(WebhookDelivery, due.id, with_for_update=True)
    if delivery is None or endpoint is None:
        return
    session.add(
        WebhookAttempt(
            tenant_id=delivery.tenant_id,
            delivery_id=delivery.id,
            attempt=due.attempt,
            status_code=result.status_code,
            duration_ms=round(result.duration_ms, 2),
            response_excerpt=(result.response_excerpt or "")[:_EXCERPT_CHARS],
            error=(result.error or None) and result.error[:500],
        )
    )
    if delivery.status != "pending" or delivery.attempts != due.attempt:
        return  # replayed or taken over meanwhile: the newer attempt decides
    delivery.last_status_code = result.status_code
    delivery.last_error = (result.error or None) and result.error[:500]
    now = now_ts()
    if result.ok:
        delivery.status = "succeeded"
        delivery.delivered_at = now
        endpoint.failing_since = None
        return
    if result.status_code == 410:
        delivery.status = "failed"
        _disable(session, endpoint, "The endpoint answered 410 Gone; deliveries stopped.", now)
        return
    delay = retry_delay_seconds(settings.retry_schedule, due.attempt)
    if delay is None:
        delivery.status = "failed"
    elif not endpoint.enabled:  # disabled while this attempt ran: wait for it to be enabled
        delivery.next_attempt_at_ms = PARKED_AT_MS
    else:
        delivery.next_attempt_at_ms = now_ms() + int(delay * 1000)
    if endpoint.failing_since is None or (
        due.attempt == 1 and not _failing_elsewhere(session, endpoint.id, delivery.id)
    ):
        # A new streak: the first failure of a delivery while no other delivery to this
        # endpoint is failing. A streak that ended in exhausted retries, long ago, does not
        # count against a receiver that has since recovered.
        endpoint.failing_since = now
    elif now - endpoint.failing_since >= settings.webhook_disable_after_seconds:
        _disable(
            session,
            endpoint,
            f"Every delivery has failed for {now - endpoint.failing_since} s (last: "
            f"{result.status_code or result.error}); deliveries stopped until it is enabled again.",
            now,
        )


def _failing_elsewhere(session: Session, endpoint_id: str, delivery_id: str) -> bool:
    """Whether another delivery to the endpoint is still being retried after a failure."""
    found = session.scalar(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.endpoint_id == endpoint_id,
            WebhookDelivery.id != delivery_id,
            WebhookDelivery.status == "pending",
            (WebhookDelivery.last_status_code.is_not(None))
            | (WebhookDelivery.last_error.is_not(None)),
        )
        .limit(1)
    )
    return found is not None


def _disable(session: Session, endpoint: WebhookEndpoint, reason: str, now: int) -> None:
    if endpoint.enabled:
        endpoint.enabled = False
        endpoint.disabled_reason = reason[:500]
        endpoint.disabled_at = now
        session.flush()
        set_parked(session, endpoint.id, True)  # they wait for the tenant to enable it
        log.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)


def deliver(
    factory: sessionmaker[Session],
    settings: WorkerSettings,
    client: SafeWebhookClient,
    due: DueDelivery,
) -> bool:
    result = send(client, due)
    with transaction(factory) as session:
        record(session, settings, due, result)
    return result.ok


def make_client(settings: WorkerSettings) -> SafeWebhookClient:
    return SafeWebhookClient(
        allow_hosts=settings.webhook_allowed_hosts, timeout=settings.webhook_timeout_seconds
    )


class WebhookSender:
    """Each worker's background sender: claims due deliveries as sending threads come free
    (never more than it can start at once, so a claim's lease only has to cover one send) and
    sends them; polls every ``webhook_poll_seconds``, or at once when woken."""

    def __init__(self, factory: sessionmaker[Session], settings: WorkerSettings) -> None:
        self._factory = factory
        self._settings = settings
        self._client = make_client(settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._free = threading.Semaphore(settings.webhook_concurrency)
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(20)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """Look for due deliveries now (a new one was queued) instead of at the next poll."""
        self._wake.set()

    def claim_and_send(self) -> int:
        """Claim as many due deliveries as there are free sending threads and start them."""
        slots = 0
        while self._free.acquire(blocking=False):
            slots += 1
        if not slots:
            return 0
        try:
            with transaction(self._factory) as session:
                due = claim_due(session, self._settings, limit=slots)
        except BaseException:
            for _ in range(slots):
                self._free.release()
            raise
        for _ in range(slots - len(due)):
            self._free.release()
        for item in due:
            self._pool.submit(self._send_one, item)
        return len(due)

    def _send_one(self, item: DueDelivery) -> None:
        try:
            deliver(self._factory, self._settings, self._client, item)
        except Exception:
            log.exception("webhook delivery failed unexpectedly")
        finally:
            self._free.release()
            self._wake.set()  # a thread is free: more may be due

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.claim_and_send()
            except Exception:
                log.exception("webhook sender pass failed")
            self._wake.wait(self._settings.webhook_poll_seconds)


# The sender of this process (a worker runs one), for the wake-up task to poke.
_local_sender: WebhookSender | None = None


def set_local_sender(sender: WebhookSender | None) -> None:
    global _local_sender
    _local_sender = sender


def wake_local_sender() -> bool:
    """Wake this process's sender; False when none runs here."""
    if _local_sender is None:
        return False
    _local_sender.wake()
    return True

"""A headless Chromium (Debian's, driven by Playwright) against the API's /admin, and helpers
that put rows in the API's database the way a worker or the API would have.

Screenshots of every page go to artifacts/admin/ (ignored by git) for review.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_SECRET, RunningApi, TenantCreds, free_port, start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[3] / "artifacts" / "admin"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="package")
def browser():  # type: ignore[no-untyped-def]
    if not CHROMIUM.exists():
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            # In CI a missing browser is a broken image, not a reason to pass quietly.
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser, api_server: RunningApi):  # type: ignore[no-untyped-def]
    """Factory of pages, each in a fresh browser context (its own cookies); ``base_url``: of
    another API replica than the session's."""
    contexts = []

    def factory(base_url: str | None = None):  # type: ignore[no-untyped-def]
        context = browser.new_context(base_url=base_url or api_server.base_url)
        context.set_default_timeout(10_000)
        contexts.append(context)
        return context.new_page()

    yield factory
    for context in contexts:
        context.close()


@pytest.fixture
def start_api(api_server: RunningApi, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Start another API replica on the same database (what a second pod or a restart is):
    ``start_api(**env)`` sets ``LORAPLEX_*`` variables while it starts (the dashboard reads
    them then) and returns its base URL. Stopped at the end of the test."""
    from api.app import create_app

    running = []

    def start(**env: str) -> str:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = api_server.settings.model_copy(update={"dispatcher_enabled": False})  # type: ignore[attr-defined]
        port = free_port()
        running.append(start_server(create_app(settings), port))
        for name in env:
            monkeypatch.delenv(name)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)


def cookie_of(page) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return next(c for c in page.context.cookies() if c["name"] == "lpx_admin_session")


def get_with_cookie(base_url: str, path: str, cookie: dict) -> httpx.Response:  # type: ignore[type-arg]
    """A request from another client holding a copy of the cookie (no redirects followed)."""
    with httpx.Client(base_url=base_url, cookies={cookie["name"]: cookie["value"]}) as client:
        return client.get(path, follow_redirects=False)


def form_token(client: httpx.Client, path: str = "/admin") -> str:
    """The CSRF token in the forms of a page (the login form's, on /admin/login)."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert found is not None, path
    return found.group(1)


@contextmanager
def http_client(base_url: str, email: str | None = None) -> Iterator[httpx.Client]:
    """A plain HTTP client (no browser, no redirects followed), logged in as ``email`` when
    one is given."""
    with httpx.Client(base_url=base_url, follow_redirects=False, timeout=60) as client:
        if email is not None:
            form = {
                "email": email,
                "password": PASSWORD,
                "csrf_token": form_token(client, "/admin/login"),
            }
            answer = client.post("/admin/login", data=form)
            assert answer.status_code == 303, answer.text
        yield client


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def login(page, email: str, password: str = PASSWORD) -> None:  # type: ignore[no-untyped-def]
    page.goto("/admin/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


@dataclass
class Seeder:
    """Writes rows straight into the API's database (what workers would have written)."""

    api: RunningApi

    def _tx(self):  # type: ignore[no-untyped-def]
        from models_db.session import transaction

        return transaction(self.api.session_factory)  # type: ignore[arg-type]

    def user(self, role: str, tenant_id: str | None = None) -> str:
        from api.admin.service import create_user

        email = f"{role}-{secrets.token_hex(4)}@example.com"
        with self._tx() as session:
            create_user(session, email, PASSWORD, role, tenant_id)
        return email

    def user_row(self, email: str):  # type: ignore[no-untyped-def]
        """The users row of ``email`` (None when there is none)."""
        from api.admin.repository import AdminRepository

        with self._tx() as session:
            return AdminRepository(session, None).user_by_email(email)

    def user_id(self, email: str) -> str:
        row = self.user_row(email)
        assert row is not None, email
        return str(row.id)

    def running_job(self, tenant_id: str) -> str:
        from common import ids
        from models_db.models import File, FineTuningJob

        now = int(time.time())
        file_id, job_id = ids.new_id(ids.FILE), ids.new_id(ids.JOB)
        params = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "lora_r": 8}
        with self._tx() as session:
            session.add(
                File(
                    id=file_id,
                    tenant_id=tenant_id,
                    filename="train.jsonl",
                    purpose="fine-tune",
                    bytes=12_345,
                    sha256="ab" * 32,
                    storage_key=f"files/{file_id}",
                    format="chat",
                    examples=120,
                )
            )
            session.flush()
            session.add(
                FineTuningJob(
                    id=job_id,
                    tenant_id=tenant_id,
                    base_model_id="tiny-llama",
                    training_file_id=file_id,
                    seed=7,
                    method={"type": "supervised", "supervised": {"hyperparameters": params}},
                    status="running",
                    attempt=1,
                    worker_id="worker-admin-test",
                    lease_until=now + 600,
                    started_at=now,
                )
            )
        return job_id

    def metrics(self, tenant_id: str, job_id: str, step: int, **data: float) -> None:
        from common import ids
        from models_db.models import JobEvent

        with self._tx() as session:
            session.add(
                JobEvent(
                    id=ids.new_id(ids.JOB_EVENT),
                    tenant_id=tenant_id,
                    job_id=job_id,
                    type="metrics",
                    message=f"Step {step}/20",
                    data={"step": step, "total_steps": 20, **data},
                )
            )

    def finish_cancel(self, job_id: str) -> None:
        """What the worker does when it sees the cancel request."""
        from models_db.models import FineTuningJob

        with self._tx() as session:
            job = session.get(FineTuningJob, job_id)
            assert job is not None
            job.status, job.finished_at, job.worker_id = "cancelled", int(time.time()), None

    def job(self, job_id: str):  # type: ignore[no-untyped-def]
        from models_db.models import FineTuningJob

        with self._tx() as session:
            return session.get(FineTuningJob, job_id)

    def failed_delivery(self, tenant_id: str) -> tuple[str, str]:
        from common import ids
        from common.webhooks.signing import encrypt_secret, generate_secret
        from models_db.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

        endpoint_id, delivery_id = (
            ids.new_id(ids.WEBHOOK_ENDPOINT),
            ids.new_id(ids.WEBHOOK_DELIVERY),
        )
        with self._tx() as session:
            session.add(
                WebhookEndpoint(
                    id=endpoint_id,
                    tenant_id=tenant_id,
                    url="https://hooks.example.com/loraplex",
                    events=["fine_tuning.job.succeeded"],
                    secret_encrypted=encrypt_secret(TEST_SECRET, generate_secret()),
                    enabled=True,
                )
            )
            session.flush()
            session.add(
                WebhookDelivery(
                    id=delivery_id,
                    tenant_id=tenant_id,
                    endpoint_id=endpoint_id,
                    event_id=ids.new_id(ids.WEBHOOK_EVENT),
                    event_type="fine_tuning.job.succeeded",
                    body="{}",
                    status="failed",
                    attempts=2,
                    next_attempt_at_ms=0,
                    last_status_code=500,
                    last_error="HTTP 500",
                )
            )
            session.flush()
            session.add_all(
                WebhookAttempt(
                    tenant_id=tenant_id,
                    delivery_id=delivery_id,
                    attempt=n,
                    status_code=500,
                    duration_ms=12.5,
                    response_excerpt="upstream exploded",
                )
                for n in (1, 2)
            )
        return endpoint_id, delivery_id

    def usage(self, tenant_id: str, kind: str, quantity: int) -> None:
        from models_db.models import UsageRecord

        with self._tx() as session:
            session.add(UsageRecord(tenant_id=tenant_id, kind=kind, quantity=quantity))

    def delivery_status(self, delivery_id: str) -> str:
        from models_db.models import WebhookDelivery

        with self._tx() as session:
            row = session.get(WebhookDelivery, delivery_id)
            assert row is not None
            return row.status


@pytest.fixture
def seed(api_server: RunningApi) -> Seeder:
    return Seeder(api_server)


@pytest.fixture
def tenant(make_tenant) -> Iterator[TenantCreds]:  # type: ignore[no-untyped-def]
    yield make_tenant()

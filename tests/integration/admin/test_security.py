"""The dashboard as an attacker sees it: guessing passwords in parallel, malformed tokens and
fields, what a tenant's users learn about the shared fleet, markup in tenant-controlled text."""

from __future__ import annotations

import secrets
import threading
from contextlib import ExitStack

import httpx

from tests.conftest import TenantCreds
from tests.integration.admin.conftest import Seeder, form_token, http_client

MARKUP = "\"'><svg/onload=alert(1)>"


def test_parallel_guesses_do_not_slip_past_the_login_throttle(  # type: ignore[no-untyped-def]
    api_server, seed: Seeder
) -> None:
    # Each guess is counted before its (slow) password check: a burst sent at once gets the
    # same 5 tries as guesses sent one by one, not one try per request in flight.
    email = seed.user("platform-admin")
    with ExitStack() as stack:
        clients = [stack.enter_context(http_client(api_server.base_url)) for _ in range(12)]
        forms = [
            {"email": email, "password": "wrong guess " + secrets.token_hex(4), "csrf_token": t}
            for t in (form_token(c, "/admin/login") for c in clients)
        ]
        start = threading.Barrier(len(clients))
        answers: list[int] = []

        def guess(client: httpx.Client, form: dict[str, str]) -> None:
            start.wait()
            answers.append(client.post("/admin/login", data=form).status_code)

        threads = [
            threading.Thread(target=guess, args=pair) for pair in zip(clients, forms, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert sorted(answers) == [401] * 5 + [429] * 7


def test_malformed_tokens_cookies_and_fields_get_a_4xx_not_a_500(  # type: ignore[no-untyped-def]
    api_server, seed: Seeder, tenant: TenantCreds
) -> None:
    base = api_server.base_url
    email = seed.user("tenant-admin", tenant.tenant_id)
    with http_client(base) as anonymous:
        form_token(anonymous, "/admin/login")  # sets the pre-login cookie
        # A token that is not ASCII (hmac.compare_digest refuses to compare such a str).
        forged = {"email": email, "password": "whatever!!", "csrf_token": "é" * 43}
        assert anonymous.post("/admin/login", data=forged).status_code == 403
        # NUL can be stored in no column and looked up in none.
        nul = {
            "email": "a\x00b@example.com",
            "password": "whatever!!",
            "csrf_token": form_token(anonymous, "/admin/login"),
        }
        assert anonymous.post("/admin/login", data=nul).status_code == 400

    with http_client(base, email) as client:
        cookie = client.cookies["lpx_admin_session"]
        forged_cookie = cookie.rpartition(".")[0] + "." + "é" * 43
        with httpx.Client(base_url=base) as other:
            answer = other.get(
                "/admin/jobs",
                headers=[(b"cookie", f"lpx_admin_session={forged_cookie}".encode("latin-1"))],
            )
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/admin/login")

        assert client.post("/admin/logout", data={"csrf_token": "é"}).status_code == 403
        token = form_token(client)
        new_user = {
            "csrf_token": token,
            "email": "x\x00y@example.com",
            "password": "long enough password",
            "role": "member",
        }
        assert client.post("/admin/users", data=new_user).status_code == 400
        new_key = {"csrf_token": token, "name": "a\x00b", "scopes": "inference"}
        assert (
            client.post(f"/admin/tenants/{tenant.tenant_id}/keys", data=new_key).status_code == 400
        )
        assert client.get(f"/admin/audit?before={2**70}").status_code == 400
        assert client.get("/admin").status_code == 200  # still logged in


def test_tenant_users_do_not_see_the_shared_fleet(  # type: ignore[no-untyped-def]
    api_server, seed: Seeder, tenant: TenantCreds, tiny_model_dir
) -> None:
    # Worker host names and where base weights live are the platform's, not a tenant's.
    job_id = seed.running_job(tenant.tenant_id)
    with http_client(api_server.base_url, seed.user("platform-admin")) as platform:
        assert "worker-admin-test" in platform.get("/admin").text
        assert "worker-admin-test" in platform.get(f"/admin/jobs/{job_id}").text
        assert str(tiny_model_dir) in platform.get("/admin/models").text
    for role in ("tenant-admin", "member"):
        with http_client(api_server.base_url, seed.user(role, tenant.tenant_id)) as client:
            overview, job = client.get("/admin"), client.get(f"/admin/jobs/{job_id}")
            assert job_id in overview.text and job.status_code == 200
            assert "worker-admin-test" not in overview.text
            assert "worker-admin-test" not in job.text
            models = client.get("/admin/models")
            assert "tiny-llama" in models.text
            assert str(tiny_model_dir) not in models.text


def test_tenant_controlled_text_is_shown_as_text(  # type: ignore[no-untyped-def]
    api_server, seed: Seeder, tenant: TenantCreds
) -> None:
    # Autoescaping is the one defence (the CSP would stop an inline handler, but not markup):
    # every field a tenant can fill comes back escaped, in text and in attributes.
    from common import ids
    from models_db.models import (
        ApiKey,
        File,
        FineTuningJob,
        JobEvent,
        WebhookAttempt,
        WebhookDelivery,
        WebhookEndpoint,
    )

    job_id = seed.running_job(tenant.tenant_id)
    endpoint_id, delivery_id = seed.failed_delivery(tenant.tenant_id)
    with seed._tx() as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        job.fine_tuned_model = "ft:tiny-llama:" + MARKUP
        job.error = {"message": MARKUP, "code": MARKUP}
        job.method = {"type": "supervised", "supervised": {"hyperparameters": {MARKUP: MARKUP}}}
        session.add(
            JobEvent(
                id=ids.new_id(ids.JOB_EVENT),
                tenant_id=tenant.tenant_id,
                job_id=job_id,
                message=MARKUP,
            )
        )
        file = session.get(File, job.training_file_id)
        assert file is not None
        file.filename = MARKUP
        key = session.get(ApiKey, tenant.key_id)
        assert key is not None
        key.name = MARKUP
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        assert endpoint is not None
        endpoint.url = "javascript:" + MARKUP
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        delivery.last_error = MARKUP
        for attempt in session.query(WebhookAttempt).filter_by(delivery_id=delivery_id):
            attempt.response_excerpt = MARKUP
    pages = [
        "/admin",
        "/admin/jobs",
        f"/admin/jobs/{job_id}",
        "/admin/files",
        "/admin/webhooks",
        f"/admin/tenants/{tenant.tenant_id}",
        f"/admin/jobs?model={MARKUP}",
        f"/admin/audit?action={MARKUP}",
    ]
    with http_client(api_server.base_url, seed.user("platform-admin")) as client:
        for path in pages:
            body = client.get(path).text
            assert "<svg/onload" not in body, path
            assert "&lt;svg/onload=alert(1)&gt;" in body, path

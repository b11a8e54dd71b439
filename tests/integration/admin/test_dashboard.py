"""The dashboard in a real headless Chromium: what an operator does, page by page."""

from __future__ import annotations

import re
import secrets

from playwright.sync_api import expect

from tests.conftest import TenantCreds
from tests.integration.admin.conftest import Seeder, login, shot


def test_operator_tour(new_page, seed: Seeder, tenant: TenantCreds) -> None:  # type: ignore[no-untyped-def]
    admin_email = seed.user("platform-admin")
    job_id = seed.running_job(tenant.tenant_id)
    endpoint_id, delivery_id = seed.failed_delivery(tenant.tenant_id)
    page = new_page()

    # Logging in lands on the overview, which shows the running job and its worker.
    page.goto("/admin")
    expect(page).to_have_url(re.compile(r"/admin/login\?next=%2Fadmin$"))
    shot(page, "login")
    login(page, admin_email)
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator(f"a[href='/admin/jobs/{job_id}']").first).to_be_visible()
    expect(page.locator("code", has_text="worker-admin-test")).to_be_visible()  # workers alive
    expect(page.locator("#gateway-status")).to_contain_text("not configured")
    shot(page, "overview")

    # Create a tenant, then a key: the key is shown once, afterwards only its prefix.
    page.click("nav >> text=Tenants")
    slug = "ui-" + secrets.token_hex(4)
    page.fill("#create-tenant input[name=name]", f"UI tenant {slug}")
    page.fill("#create-tenant input[name=slug]", slug)
    page.click("#create-tenant button")
    expect(page.locator("h1")).to_contain_text(f"UI tenant {slug}")
    expect(page.locator(".notice")).to_have_text("Tenant created.")
    tenant_url = page.url
    page.fill("#create-key input[name=name]", "ci key")
    page.click("#create-key button")
    secret = page.locator("#new-key-value").inner_text().strip()
    assert re.fullmatch(r"lpx_[A-Za-z0-9]{40}", secret)
    expect(page.locator("#api-keys .key-prefix")).to_have_text(secret[:8] + "…")
    shot(page, "tenant-key-created")
    page.goto(tenant_url)
    expect(page.locator("#new-key")).to_have_count(0)
    expect(page.locator("#api-keys .key-prefix")).to_have_text(secret[:8] + "…")
    assert secret not in page.content()
    shot(page, "tenant")
    page.click("nav >> text=Tenants")
    expect(page.locator("#tenants")).to_contain_text(slug)
    shot(page, "tenants")

    # A running job's chart grows while the page polls; cancel it from the page.
    seed.metrics(tenant.tenant_id, job_id, 1, train_loss=2.5)
    page.goto(f"/admin/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("running")
    points = page.locator("#loss-chart circle.pt-train")
    expect(points).to_have_count(1)
    for step, loss in ((2, 2.1), (3, 1.7), (4, 1.4)):
        seed.metrics(tenant.tenant_id, job_id, step, train_loss=loss)
    seed.metrics(tenant.tenant_id, job_id, 4, valid_loss=1.6)
    expect(points).to_have_count(4, timeout=15_000)
    expect(page.locator("#loss-chart circle.pt-valid")).to_have_count(1)
    expect(page.locator("#job-status")).to_have_text("running")  # updated without a reload
    shot(page, "job-running")
    page.click("#job-cancel")
    expect(page.locator(".notice")).to_have_text("Cancel requested.")
    expect(page.locator("#job-status")).to_have_text("running (cancel requested)")
    expect(page.locator("#job-cancel")).to_have_count(0)
    seed.finish_cancel(job_id)  # the worker stops the job...
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=15_000)  # ...seen live
    expect(page.locator("#events")).to_contain_text("Cancellation requested")
    shot(page, "job-cancelled")
    assert seed.job(job_id).cancel_requested_at is not None

    page.click("nav >> text=Jobs")
    page.select_option("select[name=status]", "cancelled")
    page.click("form.filters button")
    expect(page.locator("#jobs")).to_contain_text(job_id)
    shot(page, "jobs")

    # Replay a failed webhook delivery: it is pending again.
    page.click("nav >> text=Webhooks")
    row = page.locator(f"tr[data-delivery-id='{delivery_id}']")
    expect(row.locator(".delivery-status")).to_have_text("failed")
    page.locator(f"#{endpoint_id} details summary").first.click()
    expect(page.locator(f"#{endpoint_id}")).to_contain_text("upstream exploded")
    shot(page, "webhooks-before-replay")
    row.locator("button.replay").click()
    expect(page.locator(".notice")).to_have_text("Delivery queued again.")
    expect(page.locator(f"tr[data-delivery-id='{delivery_id}'] .delivery-status")).to_have_text(
        "pending"
    )
    assert seed.delivery_status(delivery_id) == "pending"
    shot(page, "webhooks")

    seed.usage(tenant.tenant_id, "prompt_tokens", 1200)
    seed.usage(tenant.tenant_id, "prompt_tokens", 34)
    seed.usage(tenant.tenant_id, "trained_tokens", 56_000)
    for name, heading in (
        ("files", "Dataset files"),
        ("models", "Models"),
        ("usage", "Usage by tenant and day"),
        ("audit", "Audit log"),
    ):
        page.goto(f"/admin/{name}")
        expect(page.locator("h1")).to_have_text(heading)
        shot(page, name)

    usage_row = page.locator("#usage tr", has_text=tenant.slug)
    page.goto("/admin/usage")
    expect(usage_row).to_contain_text("1,234")
    expect(usage_row).to_contain_text("56,000")

    # Every action above is in the audit log under the user who did it.
    page.goto("/admin/audit")
    log = page.locator("#audit")
    for action in ("tenant.create", "api_key.create", "job.cancel", "webhook_delivery.replay"):
        expect(log.locator("tr", has_text=action).first).to_contain_text("user:user-")
    expect(log.locator("tr", has_text="tenant.create").first).not_to_contain_text("cli")

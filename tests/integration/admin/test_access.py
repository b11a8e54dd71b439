"""What the dashboard refuses: forged forms, other tenants, members' actions, ended sessions,
password guessing."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.conftest import TenantCreds
from tests.integration.admin.conftest import (
    PASSWORD,
    Seeder,
    cookie_of,
    get_with_cookie,
    login,
    shot,
)


def test_form_without_valid_csrf_token_is_refused(new_page, seed: Seeder) -> None:  # type: ignore[no-untyped-def]
    page = new_page()
    login(page, seed.user("platform-admin"))
    expect(page.locator("h1")).to_have_text("Overview")

    # A form posted without its token (what another site's form would send with our cookie).
    response = page.request.post("/admin/tenants", form={"name": "Forged tenant"})
    assert response.status == 403
    assert "CSRF" in response.text()

    # The page's own form with its token tampered with.
    page.goto("/admin/tenants")
    page.fill("#create-tenant input[name=name]", "Tampered tenant")
    page.eval_on_selector("#create-tenant input[name=csrf_token]", "e => e.value = 'x' + e.value")
    page.click("#create-tenant button")
    expect(page.locator("h1")).to_have_text("Error 403")
    shot(page, "csrf-refused")
    page.goto("/admin/tenants")
    expect(page.locator("#tenants")).not_to_contain_text("Tampered tenant")
    expect(page.locator("#tenants")).not_to_contain_text("Forged tenant")


def test_tenant_admin_cannot_open_another_tenants_job(  # type: ignore[no-untyped-def]
    new_page, seed: Seeder, make_tenant
) -> None:
    mine, theirs = make_tenant(), make_tenant()
    own_job = seed.running_job(mine.tenant_id)
    other_job = seed.running_job(theirs.tenant_id)
    page = new_page()
    login(page, seed.user("tenant-admin", mine.tenant_id))
    expect(page.locator("h1")).to_have_text("Overview")

    page.goto(f"/admin/jobs/{own_job}")
    expect(page.locator("#job-status")).to_have_text("running")

    response = page.goto(f"/admin/jobs/{other_job}")
    assert response is not None and response.status == 404
    shot(page, "other-tenant-job-404")
    assert page.request.get(f"/admin/jobs/{other_job}/live.json").status == 404
    assert page.request.get(f"/admin/tenants/{theirs.tenant_id}").status == 404
    page.goto("/admin/jobs")
    expect(page.locator("#jobs")).to_contain_text(own_job)
    expect(page.locator("#jobs")).not_to_contain_text(other_job)

    # Posting to the other tenant's job, with a valid token, finds nothing either.
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    cancel = page.request.post(f"/admin/jobs/{other_job}/cancel", form={"csrf_token": token or ""})
    assert cancel.status == 404
    assert seed.job(other_job).cancel_requested_at is None


def test_member_is_read_only(new_page, seed: Seeder, tenant: TenantCreds) -> None:  # type: ignore[no-untyped-def]
    job_id = seed.running_job(tenant.tenant_id)
    page = new_page()
    login(page, seed.user("member", tenant.tenant_id))
    page.goto(f"/admin/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("running")

    with page.expect_response(re.compile(rf"/admin/jobs/{job_id}/cancel$")) as posted:
        page.click("#job-cancel")
    assert posted.value.status == 403
    expect(page.locator("h1")).to_have_text("Error 403")
    expect(page.locator("#error-message")).to_contain_text("read-only")
    shot(page, "member-cancel-403")
    assert seed.job(job_id).cancel_requested_at is None


def test_logout_ends_the_session_on_every_replica(  # type: ignore[no-untyped-def]
    new_page, seed: Seeder, api_server, start_api
) -> None:
    other_replica = start_api()
    page = new_page()
    login(page, seed.user("platform-admin"))
    expect(page.locator("h1")).to_have_text("Overview")
    session_cookie = cookie_of(page)
    assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Lax"
    # A copy of the cookie works from another client, on this replica and on another one.
    for base in (api_server.base_url, other_replica):
        assert get_with_cookie(base, "/admin/jobs", session_cookie).status_code == 200

    page.click("#logout")
    expect(page).to_have_url(re.compile(r"/admin/login$"))
    page.goto("/admin/jobs")
    expect(page).to_have_url(re.compile(r"/admin/login\?next="))
    shot(page, "logged-out")

    # The copy, replayed after logout, is refused by the server itself: on the replica that
    # served the logout, on another one, and on one started afterwards (a restart).
    for base in (api_server.base_url, other_replica, start_api()):
        replayed = get_with_cookie(base, "/admin/jobs", session_cookie)
        assert replayed.status_code == 303
        assert replayed.headers["location"].startswith("/admin/login?next=")
        assert (
            get_with_cookie(base, "/admin/jobs/ftjob-x/live.json", session_cookie).status_code
            == 401
        )
    replay = new_page()
    replay.context.add_cookies([session_cookie])
    replay.goto("/admin")
    expect(replay).to_have_url(re.compile(r"/admin/login"))


def test_login_is_throttled(new_page, seed: Seeder) -> None:  # type: ignore[no-untyped-def]
    email = seed.user("platform-admin")
    page = new_page()
    for _ in range(5):
        login(page, email, "wrong password!")
        expect(page.locator(".error")).to_have_text("Wrong email or password.")
    page.goto("/admin/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)  # even the right one, until the window passes
    with page.expect_response(lambda r: r.request.method == "POST") as answered:
        page.click("button[type=submit]")
    assert answered.value.status == 429
    assert int(answered.value.headers["retry-after"]) > 0
    expect(page.locator("h1")).to_have_text("Error 429")
    shot(page, "login-throttled")

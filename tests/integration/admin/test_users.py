"""The users page in a real browser: who may manage whom, and how ending a user's access ends
their sessions at once."""

from __future__ import annotations

import re
import secrets

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

NEW_PASSWORD = "a different password 42"


def _refused(base_url: str, cookie: dict) -> bool:  # type: ignore[type-arg]
    answer = get_with_cookie(base_url, "/admin/jobs", cookie)
    return answer.status_code == 303 and answer.headers["location"].startswith("/admin/login")


def test_create_a_user_then_disable_and_enable_them(  # type: ignore[no-untyped-def]
    new_page, seed: Seeder, tenant: TenantCreds, api_server
) -> None:
    admin = new_page()
    login(admin, seed.user("platform-admin"))
    admin.click("nav >> text=Users")
    expect(admin.locator("h1")).to_have_text("Users")
    email = f"new-{secrets.token_hex(4)}@example.com"
    form = admin.locator("#create-user")
    form.locator("input[name=email]").fill(email)
    form.locator("input[name=password]").fill(PASSWORD)
    form.locator("select[name=role]").select_option("tenant-admin")
    form.locator("select[name=tenant_id]").select_option(tenant.tenant_id)
    form.locator("button").click()
    expect(admin.locator(".notice")).to_have_text("User created.")
    expect(admin.locator("#user-role")).to_have_text("tenant-admin")
    expect(admin.locator("h1")).to_contain_text(email)
    user_page = admin.url
    shot(admin, "user-created")

    # The new user logs in; a copy of their cookie works from another client too.
    theirs = new_page()
    login(theirs, email)
    expect(theirs.locator("h1")).to_have_text("Overview")
    copied = cookie_of(theirs)
    assert get_with_cookie(api_server.base_url, "/admin/jobs", copied).status_code == 200
    admin.reload()
    expect(admin.locator("#sessions .session-state").first).to_have_text("live")

    admin.click("#toggle-user")
    expect(admin.locator(".notice")).to_contain_text("User disabled")
    expect(admin.locator("#user-state")).to_contain_text("disabled since")
    expect(admin.locator("#sessions .session-state").first).to_contain_text("(disabled)")
    shot(admin, "user-disabled")

    # Their open session has ended, the copied cookie too, and logging in again is refused.
    theirs.goto("/admin/jobs")
    expect(theirs).to_have_url(re.compile(r"/admin/login\?next="))
    assert _refused(api_server.base_url, copied)
    login(theirs, email)
    expect(theirs.locator(".error")).to_have_text("Wrong email or password.")
    shot(theirs, "disabled-user-login-refused")

    # Enabled from the list again, they can log in (the old cookie stays dead).
    admin.goto(f"/admin/users?tenant={tenant.tenant_id}")
    row = admin.locator("#users tr", has_text=email)
    expect(row.locator(".user-state")).to_have_text("disabled")
    shot(admin, "users")
    row.locator("button.toggle-user").click()
    expect(admin.locator(".notice")).to_have_text("User enabled.")
    assert admin.url.startswith(user_page.split("?")[0])
    login(theirs, email)
    expect(theirs.locator("h1")).to_have_text("Overview")
    assert _refused(api_server.base_url, copied)

    admin.goto("/admin/audit")
    log = admin.locator("#audit")
    for action in ("user.create", "user.disable", "user.enable"):
        expect(log.locator("tr", has_text=action).first).to_contain_text("user:user-")
    shot(admin, "audit-users")


def test_password_reset_and_end_sessions_log_the_user_out(  # type: ignore[no-untyped-def]
    new_page, seed: Seeder, tenant: TenantCreds, api_server, start_api
) -> None:
    other_replica = start_api()
    email = seed.user("member", tenant.tenant_id)
    admin = new_page()
    login(admin, seed.user("tenant-admin", tenant.tenant_id))
    theirs = new_page()
    login(theirs, email)
    expect(theirs.locator("h1")).to_have_text("Overview")
    copied = cookie_of(theirs)

    admin.goto("/admin/users")
    admin.locator("#users a", has_text=email).click()
    admin.fill("#reset-password input[name=password]", NEW_PASSWORD)
    admin.click("#reset-password button")
    expect(admin.locator(".notice")).to_contain_text("Password changed")
    expect(admin.locator("#sessions .session-state").first).to_contain_text("(password_reset)")
    shot(admin, "user-password-reset")

    theirs.goto("/admin")
    expect(theirs).to_have_url(re.compile(r"/admin/login"))
    for base in (api_server.base_url, other_replica):
        assert _refused(base, copied)
    login(theirs, email, PASSWORD)
    expect(theirs.locator(".error")).to_have_text("Wrong email or password.")
    login(theirs, email, NEW_PASSWORD)
    expect(theirs.locator("h1")).to_have_text("Overview")
    second = cookie_of(theirs)

    # "End all sessions" logs them out again but keeps the password.
    admin.click("#end-sessions")
    expect(admin.locator(".notice")).to_have_text("Every session of this user ended.")
    theirs.goto("/admin/jobs")
    expect(theirs).to_have_url(re.compile(r"/admin/login\?next="))
    assert _refused(other_replica, second)
    login(theirs, email, NEW_PASSWORD)
    expect(theirs.locator("h1")).to_have_text("Overview")
    assert seed.user_row(email).disabled_at is None


def test_member_cannot_manage_users(new_page, seed: Seeder, tenant: TenantCreds) -> None:  # type: ignore[no-untyped-def]
    peer = seed.user_id(seed.user("member", tenant.tenant_id))
    page = new_page()
    login(page, seed.user("member", tenant.tenant_id))
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("nav a", has_text="Users")).to_have_count(0)
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""

    response = page.goto("/admin/users")
    assert response is not None and response.status == 403
    expect(page.locator("#error-message")).to_contain_text("Members cannot manage users")
    shot(page, "member-users-403")
    assert page.goto(f"/admin/users/{peer}").status == 403  # type: ignore[union-attr]

    # Its forms, posted with the member's valid token, are refused too.
    for path in (f"/admin/users/{peer}/disable", f"/admin/users/{peer}/end-sessions"):
        assert page.request.post(path, form={"csrf_token": token}).status == 403
    email = f"sneaky-{secrets.token_hex(4)}@example.com"
    created = page.request.post(
        "/admin/users",
        form={"csrf_token": token, "email": email, "password": PASSWORD, "role": "member"},
    )
    assert created.status == 403
    assert seed.user_row(email) is None


def test_tenant_admin_manages_only_their_tenant(  # type: ignore[no-untyped-def]
    new_page, seed: Seeder, make_tenant
) -> None:
    mine, theirs = make_tenant(), make_tenant()
    stranger_email = seed.user("member", theirs.tenant_id)
    stranger = seed.user_id(stranger_email)
    page = new_page()
    login(page, seed.user("tenant-admin", mine.tenant_id))
    page.click("nav >> text=Users")
    expect(page.locator("#users")).not_to_contain_text(stranger_email)
    options = page.locator("#create-user select[name=role] option")
    expect(options).to_have_text(["tenant-admin", "member"])  # no platform-admin to pick
    expect(page.locator("#create-user select[name=tenant_id]")).to_have_count(0)

    email = f"teammate-{secrets.token_hex(4)}@example.com"
    page.fill("#create-user input[name=email]", email)
    page.fill("#create-user input[name=password]", PASSWORD)
    page.click("#create-user button")
    expect(page.locator(".notice")).to_have_text("User created.")
    assert seed.user_row(email).tenant_id == mine.tenant_id
    shot(page, "tenant-admin-user-created")
    token = page.locator("input[name=csrf_token]").first.get_attribute("value") or ""

    # Another tenant's user is not found, to look at or to act on.
    response = page.goto(f"/admin/users/{stranger}")
    assert response is not None and response.status == 404
    shot(page, "other-tenant-user-404")
    for path in ("disable", "end-sessions", "password", "role"):
        posted = page.request.post(
            f"/admin/users/{stranger}/{path}",
            form={"csrf_token": token, "password": PASSWORD + "!", "role": "member"},
        )
        assert posted.status == 404, path
    assert seed.user_row(stranger_email).disabled_at is None

    # Forged forms cannot make a platform admin, promote above their role, or reach the
    # other tenant.
    root_email = f"root-{secrets.token_hex(4)}@example.com"
    forged = page.request.post(
        "/admin/users",
        form={
            "csrf_token": token,
            "email": root_email,
            "password": PASSWORD,
            "role": "platform-admin",
        },
    )
    assert forged.status == 403
    assert seed.user_row(root_email) is None
    elsewhere = page.request.post(
        "/admin/users",
        form={
            "csrf_token": token,
            "email": root_email,
            "password": PASSWORD,
            "role": "member",
            "tenant_id": theirs.tenant_id,
        },
    )
    assert elsewhere.status == 404
    assert seed.user_row(root_email) is None
    teammate = seed.user_id(email)
    promoted = page.request.post(
        f"/admin/users/{teammate}/role", form={"csrf_token": token, "role": "platform-admin"}
    )
    assert promoted.status == 403
    assert seed.user_row(email).role == "member"

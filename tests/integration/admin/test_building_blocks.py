"""The dashboard's pure parts: session cookies, CSRF tokens, the throttle, the loss chart."""

from __future__ import annotations

from api.admin.chart import loss_chart_svg, loss_series
from api.admin.sessions import LoginThrottle, SessionSigner, hash_password, verify_password
from models_db.models import JobEvent

SECRET = "s" * 32


def test_session_cookie_is_bound_to_secret_age_and_password() -> None:
    signer = SessionSigner(SECRET, lifetime_seconds=3600)
    cookie = signer.issue("user-1", "hash-a", now=1_000_000)
    claims = signer.parse(cookie, now=1_000_100)
    assert claims is not None and claims.user_id == "user-1"
    assert signer.verify(cookie, "hash-a")
    assert not signer.verify(cookie, "hash-b")  # the password changed: every session ends
    assert signer.parse(cookie, now=1_000_000 + 3601) is None  # expired
    assert not SessionSigner("t" * 32, 3600).verify(cookie, "hash-a")  # another server secret
    _user, issued, nonce, signature = cookie.split(".")
    assert not signer.verify(f"user-2.{issued}.{nonce}.{signature}", "hash-a")
    assert signer.parse("garbage", now=1_000_000) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    signer = SessionSigner(SECRET, 3600)
    token = signer.csrf_token("nonce-a")
    assert signer.csrf_ok("nonce-a", token)
    assert not signer.csrf_ok("nonce-b", token)
    assert not signer.csrf_ok("nonce-a", None)
    assert not signer.csrf_ok("nonce-a", "")


def test_passwords_are_argon2() -> None:
    stored = hash_password("a long password")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "a long password")
    assert not verify_password(stored, "another password")
    assert not verify_password(None, "a long password")
    assert not verify_password("not a hash", "a long password")


def test_throttle_counts_attempts_per_email_and_address() -> None:
    throttle = LoginThrottle(attempts=2, window=60)
    assert throttle.attempt("A@example.com", "1.2.3.4") == 0
    assert throttle.attempt("a@example.com", "1.2.3.4") == 0
    assert 0 < throttle.attempt("a@example.com", "1.2.3.4") <= 61  # the third waits
    assert throttle.attempt("a@example.com", "5.6.7.8") == 0  # another address
    assert throttle.attempt("b@example.com", "1.2.3.4") == 0  # another email
    throttle.succeeded("a@example.com", "1.2.3.4")
    assert throttle.attempt("a@example.com", "1.2.3.4") == 0


def _event(data: dict[str, object]) -> JobEvent:
    return JobEvent(type="metrics", message="", data=data)


def test_loss_chart_draws_train_and_validation_points() -> None:
    series = loss_series(
        [
            _event({"step": 1, "train_loss": 2.0, "total_steps": 10}),
            _event({"step": 2, "train_loss": 1.5}),
            _event({"step": 2, "valid_loss": 1.7}),
            _event({"step": 3, "train_loss": float("nan")}),  # never drawn
            _event({"message": "no step"}),
        ]
    )
    assert series.train == [(1, 2.0), (2, 1.5)] and series.valid == [(2, 1.7)]
    assert series.total_steps == 10
    svg = loss_chart_svg(series)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="pt-train"') == 2 and svg.count('class="pt-valid"') == 1
    assert "No loss reported yet" in loss_chart_svg(loss_series([]))

"""Dashboard session cookies, CSRF tokens and the login throttle.

A session is a cookie ``USER_ID.ISSUED_AT.NONCE.SIGNATURE``. The signature is an HMAC, under a
key derived from the server secret, over the first three parts and a fingerprint of the user's
password hash, so a password change ends every session of that user. Each request checks the
signature and the age first, then the user row (not disabled, tenant not disabled) and the
session's row in ``admin_sessions`` (found by :func:`session_id` of the nonce; not revoked, not
expired), which is what lets logout end a session on every replica.
CSRF tokens are an HMAC of the session nonce (the login form: of a random pre-login cookie).
See docs/adr/0010-admin-dashboard.md for why.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_HASHER = PasswordHasher()
# Verified when the email is unknown, so a miss costs what a wrong password costs.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _HASHER.check_needs_rehash(password_hash)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _same(presented: str, expected: str) -> bool:
    # As bytes: compare_digest raises TypeError (a 500) on a str that is not ASCII, and a
    # cookie or form field is whatever the client sent.
    return hmac.compare_digest(presented.encode(), expected.encode())


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def session_id(nonce: str) -> str:
    """The ``admin_sessions`` key of a session: the table never holds the nonce itself."""
    return hashlib.sha256(nonce.encode()).hexdigest()


@dataclass(frozen=True)
class SessionClaims:
    user_id: str
    issued_at: int
    nonce: str


class SessionSigner:
    """Signs and checks session cookies and CSRF tokens with keys derived from one secret."""

    def __init__(self, secret_key: str, lifetime_seconds: int) -> None:
        root = secret_key.encode()
        self._session_key = hmac.new(root, b"loraplex/admin/session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(root, b"loraplex/admin/csrf", hashlib.sha256).digest()
        self.lifetime = lifetime_seconds

    @staticmethod
    def _credential(password_hash: str) -> str:
        return hashlib.sha256(password_hash.encode()).hexdigest()[:32]

    def _sign(self, payload: str, password_hash: str) -> str:
        message = f"{payload}.{self._credential(password_hash)}".encode()
        return _b64(hmac.new(self._session_key, message, hashlib.sha256).digest())

    def issue(
        self, user_id: str, password_hash: str, now: int | None = None, nonce: str | None = None
    ) -> str:
        issued = int(time.time()) if now is None else now
        payload = f"{user_id}.{issued}.{nonce or new_nonce()}"
        return f"{payload}.{self._sign(payload, password_hash)}"

    def parse(self, cookie: str, now: int | None = None) -> SessionClaims | None:
        """The claims of a well-formed, unexpired cookie (its signature is checked later,
        by :meth:`verify`, once the user's password hash has been read)."""
        parts = cookie.split(".")
        if len(parts) != 4 or len(cookie) > 300:
            return None
        user_id, issued_text, nonce, _signature = parts
        if not issued_text.isdigit() or not user_id or not nonce:
            return None
        issued = int(issued_text)
        current = int(time.time()) if now is None else now
        if issued > current + 60 or current - issued > self.lifetime:
            return None
        return SessionClaims(user_id, issued, nonce)

    def verify(self, cookie: str, password_hash: str) -> bool:
        payload, _, signature = cookie.rpartition(".")
        return _same(signature, self._sign(payload, password_hash))

    def csrf_token(self, binding: str) -> str:
        """The form token of a session (its nonce) or of a login form (the pre-login cookie)."""
        return _b64(hmac.new(self._csrf_key, binding.encode(), hashlib.sha256).digest())

    def csrf_ok(self, binding: str | None, presented: str | None) -> bool:
        if not binding or not presented:
            return False
        return _same(presented, self.csrf_token(binding))


class LoginThrottle:
    """At most ``attempts`` logins per (email, client address) within ``window``; a login that
    succeeds clears its key, so in effect these are the failed ones."""

    def __init__(self, attempts: int, window: float, max_keys: int = 10_000) -> None:
        self.attempts = attempts
        self.window = window
        self._max_keys = max_keys
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        found = self._failures.get(key)
        if found is None:
            return deque()
        while found and found[0] <= now - self.window:
            found.popleft()
        return found

    def attempt(self, email: str, client: str) -> int:
        """Count a login attempt before its password is checked; the seconds to wait (and
        nothing counted) when the limit is reached, else 0. Checking and counting under one
        lock is what stops a burst of parallel guesses from all passing the check while the
        first ones are still being verified."""
        now = time.monotonic()
        key = (email.lower(), client)
        with self._lock:
            recent = self._recent(key, now)
            wait = self._wait(recent, now)
            if not wait:
                self._record(key, recent, now)
            return wait

    def _wait(self, recent: deque[float], now: float) -> int:
        """Seconds until the oldest counted failure leaves the window; 0 below the limit."""
        if len(recent) < self.attempts:
            return 0
        return max(1, int(recent[0] + self.window - now) + 1)

    def _record(self, key: tuple[str, str], recent: deque[float], now: float) -> None:
        if key not in self._failures and len(self._failures) >= self._max_keys:
            # Forget keys whose failures have all aged out of the window.
            self._failures = {k: v for k, v in self._failures.items() if self._recent(k, now)}
        recent.append(now)
        self._failures[key] = recent

    def succeeded(self, email: str, client: str) -> None:
        with self._lock:
            self._failures.pop((email.lower(), client), None)

"""API key format and hashing: ``lpx_`` + 40 random characters, stored only as an HMAC."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

KEY_PREFIX = "lpx_"
_ALPHABET = string.ascii_letters + string.digits
SCOPES = ("finetune", "inference", "admin")


def generate_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(40))


def hash_key(secret_key: str, api_key: str) -> str:
    """Keyed hash so a leaked table cannot be brute-forced without the server secret."""
    return hmac.new(secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 20 <= len(value) <= 100 and value.isascii()

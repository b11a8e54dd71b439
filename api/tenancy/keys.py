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


class BadAuthorization(ValueError):
    """The Authorization header is missing or not ``Bearer KEY``; ``code`` is OpenAI's."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def bearer_token(headers: list[str]) -> str:
    """The key of the request's ``Authorization: Bearer KEY`` header, given every Authorization
    header it carried (the API's and the gateway's rule). Two are refused: a proxy in front
    could read the other one and see a different caller."""
    if len(headers) > 1:
        raise BadAuthorization(
            "More than one Authorization header; send exactly one.", "invalid_api_key"
        )
    header = headers[0] if headers else ""
    scheme, _, token = header.partition(" ")
    if not header:
        raise BadAuthorization(
            "You didn't provide an API key. Provide it in the Authorization header as "
            "'Bearer YOUR_KEY'.",
            "missing_api_key",
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise BadAuthorization(
            "Malformed Authorization header; expected 'Bearer YOUR_KEY'.", "invalid_api_key"
        )
    return token.strip()


def incorrect_key_message(token: str) -> str:
    """What a caller with an unknown key is told: never more of the key than its start."""
    shown = token[:8] + "…" if len(token) > 8 else "…"
    return f"Incorrect API key provided: {shown}"

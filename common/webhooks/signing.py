"""Standard Webhooks v1 secrets and signatures.

A secret is ``whsec_`` + base64 of 24 random bytes; the signature of a message is
``v1,`` + base64(HMAC-SHA256(secret bytes, "{webhook-id}.{webhook-timestamp}.{body}")). During a
rotation's overlap the header carries one signature per live secret, space-separated, and a
receiver accepts the message when any of them verifies.

Secrets are stored encrypted (AES-GCM under a key derived from the server secret): a leaked
table does not let anyone forge our webhooks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format marker, not a secret


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    message = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(live_secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers, signed with every live secret."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in live_secrets),
    }


def _cipher(server_secret: str) -> AESGCM:
    key = hashlib.sha256(b"loraplex webhook secrets\x00" + server_secret.encode()).digest()
    return AESGCM(key)


def encrypt_secret(server_secret: str, secret: str) -> str:
    nonce = secrets.token_bytes(12)
    sealed = _cipher(server_secret).encrypt(nonce, secret.encode(), b"webhook-secret")
    return base64.b64encode(nonce + sealed).decode()


def decrypt_secret(server_secret: str, stored: str) -> str:
    raw = base64.b64decode(stored)
    return _cipher(server_secret).decrypt(raw[:12], raw[12:], b"webhook-secret").decode()

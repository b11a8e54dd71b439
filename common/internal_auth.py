"""Signed calls between our own processes (a worker asking the gateway for a parity check).

The body is signed with the server secret: ``v1=<hex HMAC-SHA256 of "timestamp.body">``, and a
signature older than five minutes is refused, so a captured request cannot be replayed later.
Tenants never hold the secret, so these endpoints are out of their reach.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "x-loraplex-signature"
TIMESTAMP_HEADER = "x-loraplex-timestamp"
MAX_AGE_SECONDS = 300


def _digest(secret_key: str, timestamp: str, body: bytes) -> str:
    message = timestamp.encode() + b"." + body
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


def sign(secret_key: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate ``body`` as sent by a holder of the server secret."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: "v1=" + _digest(secret_key, timestamp, body),
    }


def verify(secret_key: str, body: bytes, headers: dict[str, str], now: float | None = None) -> bool:
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    signature = headers.get(SIGNATURE_HEADER, "")
    if not timestamp.isdigit() or not signature.startswith("v1="):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > MAX_AGE_SECONDS:
        return False
    return hmac.compare_digest(signature[3:], _digest(secret_key, timestamp, body))


REPLICAS_REQUEST = b"GET /internal/replicas"
"""What a request for the gateway's replica list signs (it has no body): the method and the
path, so that no other signed request, a parity check say, can stand in for it."""

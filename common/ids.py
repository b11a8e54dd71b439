"""Object identifiers.

Ids are a type prefix (OpenAI's, where OpenAI has one) followed by 26 characters: a 48-bit
millisecond timestamp and 80 random bits in Crockford base32. They therefore sort by creation
time, which lets every list endpoint paginate with a plain ``id < :after`` comparison, and they
are unguessable, so an id never grants anything by itself.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


_lock = threading.Lock()
_last: tuple[int, int] = (0, 0)


def new_id(prefix: str) -> str:
    """Return ``prefix`` followed by a time-ordered random suffix, e.g. ``file-01jd…``.

    Within one process ids are strictly increasing, even inside one millisecond (the random
    part of the previous id is incremented), so "created after" and "sorts after" agree.
    """
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_random = _last
        if millis <= last_millis:
            millis, random_part = last_millis, last_random + 1
        else:
            random_part = secrets.randbits(79)  # headroom: increments never wrap
        _last = (millis, random_part)
    return prefix + _encode(millis, 10) + _encode(random_part, 16)


def short_id(length: int = 8) -> str:
    """A short random token for human-facing names (fine-tuned model names)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


# Prefixes used across the code base, in one place so they stay consistent.
TENANT = "org-"
USER = "user-"
API_KEY = "key-"
FILE = "file-"
JOB = "ftjob-"
JOB_EVENT = "ftevent-"
CHECKPOINT = "ftckpt-"
WEBHOOK_ENDPOINT = "whep-"
WEBHOOK_EVENT = "evt-"
WEBHOOK_DELIVERY = "whdel-"

_ID_SHAPE = re.compile(r"[A-Za-z0-9_.:/-]{1,400}")
_SUFFIX = re.compile(f"[{_ALPHABET}]{{26}}")


def is_plausible_id(value: str) -> bool:
    """Whether a client-supplied id could name anything (rejects NUL, spaces, huge strings).

    Checked before any query so hostile input never reaches the database driver.
    """
    return _ID_SHAPE.fullmatch(value) is not None  # (not match: "$" would let "id\n" through)


def show_id(value: str, limit: int = 80) -> str:
    """A client-supplied id as an error message may quote it: cut short, so a hostile 10 kB
    "id" is not echoed back whole."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def is_id_of(prefix: str, value: str) -> bool:
    """Whether ``value`` has the shape of an id made by ``new_id(prefix)``."""
    return value.startswith(prefix) and _SUFFIX.fullmatch(value, len(prefix)) is not None

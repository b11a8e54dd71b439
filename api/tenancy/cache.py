"""A short-lived in-process memory of verified API keys.

At a hundred requests a second from one key, looking the key up on every request costs more
than the rest of a job create. Remembering it for well under a second keeps revocation within
DESIGN's 1 s while the database sees at most a few lookups per key per second.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

ValueT = TypeVar("ValueT")


class TtlCache(Generic[ValueT]):
    def __init__(self, ttl_seconds: float, max_entries: int = 10_000) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._entries: dict[str, tuple[float, ValueT]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> ValueT | None:
        if self._ttl <= 0:
            return None
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: str, value: ValueT) -> None:
        if self._ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self._max:
                now = time.monotonic()
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
                if len(self._entries) >= self._max:
                    self._entries.clear()
            self._entries[key] = (time.monotonic() + self._ttl, value)

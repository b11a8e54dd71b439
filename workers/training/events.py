"""The event stream the parent worker reads: one JSON object per line on the process's stdout.

Events (every one has ``type``; floats that are not finite become null):

* ``started``: ``total_steps``, ``resumed_from_step`` (int or null), ``device`` ("cpu"/"cuda"),
  ``dtype`` ("float32"/"bfloat16"), ``attn`` ("sdpa_varlen" for packed SFT, "sdpa", or
  "flash_attention_2"), plus ``examples`` and ``examples_per_step``.
* ``metrics``: ``step``, ``train_loss``, ``train_mean_token_accuracy``, ``learning_rate``,
  ``tokens_per_second`` (real, non-pad tokens over training time, all processes), ``epoch``.
* ``eval``: ``step``, ``valid_loss``, ``valid_mean_token_accuracy``.
* ``checkpoint``: ``step``, ``path``, ``metrics`` (latest train/valid figures); sent only once the
  folder is complete.
* ``done``: ``adapter_dir``, ``metrics``: ``train_loss`` (of the last metrics window),
  ``valid_loss`` (a final evaluation; null without valid_data), ``trained_tokens`` (loss targets
  over the whole job, resumes included), ``steps``, ``seconds`` (since this process started);
  the process then exits 0.
* ``paused``: ``step``; after the checkpoint event of that step; exit 0.
* ``error``: ``message`` (one line; the worker replaces absolute paths in it before the tenant
  sees it); exit 1.
* ``heartbeat``: ``step``; sent after a step or during an evaluation when no other event went
  out for ``HEARTBEAT_SECONDS``. The worker stops a process that sends nothing for its stall
  timeout, and any event counts as a sign of progress.

Libraries print to stdout now and then; ``EventStream.take_stdout`` moves the process's stdout to
stderr and keeps a private duplicate of the original for events, so nothing else can interleave.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import Any, TextIO

from workers.training.errors import TrainingError

HEARTBEAT_SECONDS = 30.0


class EventStream:
    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        # In a multi-process run only rank 0 reports progress; any rank may report an error.
        self.enabled = enabled
        self._last_write = time.monotonic()

    @classmethod
    def take_stdout(cls, *, enabled: bool = True) -> EventStream:
        sys.stdout.flush()
        event_fd = os.dup(1)
        os.dup2(2, 1)
        return cls(os.fdopen(event_fd, "w", encoding="utf-8", buffering=1), enabled=enabled)

    def emit(self, kind: str, **fields: Any) -> None:
        if self.enabled or kind == "error":
            self.write({"type": kind, **fields})

    def heartbeat(self, *, every: float = HEARTBEAT_SECONDS, **fields: Any) -> None:
        """A ``heartbeat`` event, unless some event went out in the last ``every`` seconds."""
        if time.monotonic() - self._last_write >= every:
            self.emit("heartbeat", **fields)

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(_finite(event), separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last_write = time.monotonic()


def error_message(exc: BaseException) -> str:
    """One line naming the failure: the message of our own errors, the type for the others."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, TrainingError | ValueError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:1000]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value

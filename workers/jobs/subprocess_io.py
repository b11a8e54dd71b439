"""Running the training recipe as a child process and reading its JSON-line events."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: the training child gets SIGKILL when the worker dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the lease still fences an orphan out
        pass


class TrainingProcess:
    """The recipe subprocess: events arrive on a queue; ``None`` marks the end of its output."""

    def __init__(self, argv: Sequence[str], *, log_path: Path, env: dict[str, str]) -> None:
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self.log_path = log_path

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.info("training output: %s", line[:500])
                continue
            if isinstance(event, dict):
                self.events.put(event)
        self.events.put(None)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, grace_seconds: float) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after the grace period."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def wait(self, exit_grace: float = 60.0) -> int:
        """The exit code, once the child has closed its output. One that closed it but does
        not exit within ``exit_grace`` (a stuck thread at shutdown, say) is stopped, rather than
        holding the worker forever."""
        try:
            code = self.proc.wait(exit_grace)
        except subprocess.TimeoutExpired:
            self.stop(grace_seconds=5.0)
            code = self.proc.wait()
        self._reader.join(5)
        self._log.close()
        return code

    def stderr_tail(self, limit: int = 1500) -> str:
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

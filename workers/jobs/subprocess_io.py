"""Running the training recipe as a child process, reading its JSON-line events, and making
its failure text fit for the tenant."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
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
        # When the child last sent an event, stamped as it arrives: time the worker spends on an
        # event (uploading a checkpoint) is not the child's silence.
        self._last_event = time.monotonic()
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
                self._last_event = time.monotonic()
                self.events.put(event)
        self.events.put(None)

    def silent_for(self) -> float:
        """Seconds since the child's latest event (or its start, before the first)."""
        return time.monotonic() - self._last_event

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


# An absolute path: a "/" at the start or after a space, quote, bracket, "=" or ",", not after a
# word character ("tokens/s") or a ":" ("https://host/…"); "file://" URLs and home-relative
# paths ("~/…", "~user/…") count as paths. It ends at whitespace, a quote, a bracket or ",;:"
# (so "/x.py:12" keeps its line number).
_PATH_START = r"""(?<![^\s'"`(\[{=,])"""
# A folder we know by name may also follow ":" (a PATH-like list): no URL starts with one.
_KNOWN_FOLDER_START = r"""(?<![^\s'"`(\[{=,:])"""
_PATH_TAIL = r"""[^\s'"`()\[\]{}<>,;:]"""
_ABSOLUTE_PATH = re.compile(_PATH_START + r"(?:file://|~[\w.-]*(?=/))?/" + _PATH_TAIL + "+")
PATH_PLACEHOLDER = "<path>"


def redact_paths(text: str, workdir: Path, folders: Iterable[Path | str] = ()) -> str:
    """``text`` with every absolute path replaced: one inside ``workdir`` by its path relative
    to it, any other (scratch and cache folders, site-packages, the base model's folder) by
    ``<path>``. Failure messages of the training child reach the tenant; the worker's own
    folders are none of the tenant's business.

    ``workdir`` and ``folders`` are also found by their exact text first, because a folder
    name with a space in it ("/srv/My Models/…") ends the generic pattern early and would leave
    the rest of the path in the message."""
    root = str(workdir).rstrip("/")
    known = {str(f).rstrip("/") for f in folders if str(f).startswith("/") and str(f) != "/"}
    literal = re.compile(
        _KNOWN_FOLDER_START
        + "(?:file://)?(?:"
        + "|".join(re.escape(f) for f in sorted(known | {root}, key=len, reverse=True))
        + f")(?:/{_PATH_TAIL}*)?(?!{_PATH_TAIL})"
    )
    text = literal.sub(lambda m: _replace_path(m.group(), root), text)
    return _ABSOLUTE_PATH.sub(lambda m: _replace_path(m.group(), root), text)


def _replace_path(found: str, root: str) -> str:
    path = found.rstrip(".")  # a sentence's full stop is not part of the path
    rest = found[len(path) :]
    path = path.removeprefix("file://")
    if path.startswith(root + "/") and len(path) > len(root) + 1:
        return path[len(root) + 1 :] + rest
    return PATH_PLACEHOLDER + rest

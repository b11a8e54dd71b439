"""``loraplex jobs watch``: a job's progress as one live line (step, loss, ETA) until it ends.

Reads the public API only (the job and its events), so it works against any loraplex server.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class Progress:
    status: str = "validating_files"
    step: int = 0
    total: int | None = None
    loss: float | None = None
    started: float | None = None  # monotonic time of the first step seen

    def line(self, width: int = 30) -> str:
        if self.total:
            done = min(1.0, self.step / self.total)
            bar = "#" * int(done * width) + "-" * (width - int(done * width))
            eta = ""
            if self.started is not None and self.step:
                rate = (time.monotonic() - self.started) / self.step
                eta = f" ETA {max(0, int(rate * (self.total - self.step)))} s"
            loss = f" loss {self.loss:.4f}" if self.loss is not None else ""
            return f"[{bar}] step {self.step}/{self.total}{loss}{eta} ({self.status})"
        return f"[{'.' * width}] {self.status}"


def watch_job(
    http: httpx.Client,
    job_id: str,
    *,
    out: IO[str] = sys.stdout,
    poll_seconds: float = 0.5,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Print progress until the job ends; returns the final job object."""
    progress = Progress()
    deadline = None if timeout is None else time.monotonic() + timeout
    tty = out.isatty()
    while True:
        job = _get(http, f"/fine_tuning/jobs/{job_id}")
        progress.status = job["status"]
        events = _get(http, f"/fine_tuning/jobs/{job_id}/events", params={"limit": 20})["data"]
        for event in events:  # newest first
            data = event.get("data") or {}
            if event.get("type") == "metrics" and "step" in data and "train_loss" in data:
                if progress.started is None:
                    progress.started = time.monotonic()
                progress.step = max(progress.step, int(data["step"]))
                progress.total = data.get("total_steps") or progress.total
                progress.loss = float(data["train_loss"])
                break
        text = progress.line()
        out.write(("\r" + text) if tty else (text + "\n"))
        out.flush()
        if job["status"] in TERMINAL:
            if tty:
                out.write("\n")
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(poll_seconds if tty else max(poll_seconds, 5.0))


def _get(http: httpx.Client, path: str, **kwargs: Any) -> dict[str, Any]:
    """GET through the outages a long watch meets (the server restarting, a 5xx): tried for
    about a minute before giving up; a 4xx (wrong key, unknown job) ends the watch at once."""
    from cli.remote import checked_json

    for attempt in range(_GET_TRIES):
        last = attempt == _GET_TRIES - 1
        try:
            response = http.get(path, **kwargs)
        except httpx.TransportError:
            if last:
                raise
            time.sleep(_GET_RETRY_SECONDS)
            continue
        if response.status_code >= 500 and not last:
            time.sleep(_GET_RETRY_SECONDS)
            continue
        return checked_json(response)
    raise AssertionError("unreachable")


_GET_TRIES = 12
_GET_RETRY_SECONDS = 5.0

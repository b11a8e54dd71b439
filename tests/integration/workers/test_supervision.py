"""Supervising the training process: one that stops sending events is stopped and its attempt
fails (the watchdog), one that keeps reporting is left alone, and what the tenant reads of a
failure names none of the worker's folders.

The training process is replaced by a short script speaking the same JSON-line events, so each
test decides exactly when it goes quiet.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from common.jobs import JobStatus
from tests.integration.workers.conftest import Jobs
from workers.jobs import runner

# Quiet for longer than any stall timeout below, then an exit that would be a different failure.
SILENT = "import time; time.sleep(20)"
SILENT_AFTER_STARTED = (
    "import json, time; print(json.dumps({'type': 'started', 'total_steps': 4}), flush=True); "
    "time.sleep(20)"
)
# Reports every 0.2 s for 6 s, then fails naming a file in the job's folder and one elsewhere.
REPORTING = textwrap.dedent(
    """
    import json, pathlib, sys, time

    def emit(**event):
        print(json.dumps(event), flush=True)

    work = pathlib.Path(sys.argv[1]).parent
    emit(type="started", total_steps=4, resumed_from_step=None)
    for _ in range(30):
        time.sleep(0.2)
        emit(type="heartbeat", step=1)
    emit(
        type="error",
        message=f"cannot read {work}/resume/adapter_model.safetensors "
        f"(see {sys.prefix}/lib/x.py)",
    )
    sys.exit(1)
    """
)


def _children(monkeypatch: pytest.MonkeyPatch, code: str) -> list[runner.TrainingProcess]:
    """Every training process the worker starts runs ``code`` (given the spec's path)."""
    started: list[runner.TrainingProcess] = []

    class Scripted(runner.TrainingProcess):
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            super().__init__([sys.executable, "-c", code, argv[-1]], **kwargs)
            started.append(self)

    monkeypatch.setattr(runner, "TrainingProcess", Scripted)
    return started


@pytest.mark.parametrize("code", [SILENT, SILENT_AFTER_STARTED], ids=["loading", "training"])
def test_a_training_process_that_goes_quiet_is_stopped_and_the_attempts_fail(
    make_jobs: Callable[..., Jobs], monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    jobs = make_jobs(stall_timeout_seconds=1.0)
    job_id = jobs.queued()
    children = _children(monkeypatch, code)

    jobs.run()

    reason = "training made no progress for 1 s; the process was stopped"
    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.FAILED, messages
    assert job.failed_attempts == 3
    assert job.error == {"code": "training_failed", "message": reason, "param": None}
    assert f"Attempt 1 failed (1 of 3 allowed failures): {reason}. Retrying." in messages
    assert len(children) == 3
    # Stopped (SIGTERM), not waited on until they gave up by themselves.
    assert all(child.proc.returncode == -15 for child in children)


def test_a_training_process_that_keeps_reporting_is_not_stopped(
    make_jobs: Callable[..., Jobs], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process runs for three times as long; the limit leaves room for a slow start on a
    # busy machine (it counts from the process's start).
    jobs = make_jobs(stall_timeout_seconds=2.0)
    job_id = jobs.queued()
    children = _children(monkeypatch, REPORTING)

    jobs.run(max_jobs=1)

    (child,) = children
    messages = jobs.messages(job_id)
    assert jobs.job(job_id).status == JobStatus.QUEUED, messages
    assert child.proc.returncode == 1  # it ended by itself, with its own error
    (failed,) = [m for m in messages if m.startswith("Attempt 1 failed")]
    # The error's message, with the worker's folders out of it: a file in the job's own
    # folder by its path there, any other path by a placeholder.
    assert failed == (
        "Attempt 1 failed (1 of 3 allowed failures): cannot read "
        "resume/adapter_model.safetensors (see <path>). Retrying."
    )


def test_a_stall_timeout_of_zero_lets_a_quiet_process_run(
    make_jobs: Callable[..., Jobs], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = make_jobs(stall_timeout_seconds=0)
    job_id = jobs.queued()
    children = _children(monkeypatch, "import time, sys; time.sleep(2); sys.exit(3)")

    jobs.run(max_jobs=1)

    (child,) = children
    messages = jobs.messages(job_id)
    assert child.proc.returncode == 3, messages
    failed = "Attempt 1 failed (1 of 3 allowed failures): training process exited with code 3"
    assert any(m.startswith(failed) for m in messages), messages


# Reports its result, then neither exits nor says anything more (a collective hanging at
# shutdown), or exits with an error code after it.
PAUSED_THEN_HANGS = (
    "import json, time; print(json.dumps({'type': 'started', 'total_steps': 4}), flush=True); "
    "print(json.dumps({'type': 'paused', 'step': 2}), flush=True); time.sleep(20)"
)
PAUSED_THEN_CRASHES = (
    "import json, sys; print(json.dumps({'type': 'started', 'total_steps': 4}), flush=True); "
    "print(json.dumps({'type': 'paused', 'step': 2}), flush=True); sys.exit(3)"
)


@pytest.mark.parametrize("code", [PAUSED_THEN_HANGS, PAUSED_THEN_CRASHES], ids=["hangs", "crashes"])
def test_what_a_process_does_after_reporting_its_result_does_not_undo_it(
    make_jobs: Callable[..., Jobs], monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    # The hang is longer than the stall limit: once a result is in, that limit no longer applies.
    jobs = make_jobs(stall_timeout_seconds=5.0)
    job_id = jobs.queued()
    children = _children(monkeypatch, code)
    monkeypatch.setattr(runner, "EXIT_GRACE_SECONDS", 0.5)

    jobs.run(max_jobs=1)

    job = jobs.job(job_id)
    messages = jobs.messages(job_id)
    assert job.status == JobStatus.PAUSED and job.failed_attempts == 0, messages
    assert "Job paused at step 2; resume it to continue." in messages
    assert not any("no progress" in m for m in messages)
    assert len(children) == 1 and children[0].proc.poll() is not None

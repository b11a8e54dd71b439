"""Scratch folders of training attempts: a worker starting deletes those of dead processes,
and nothing that a live process or another host may still be using, or that is not an
attempt's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.jobs.cleanup import (
    ORPHAN_AFTER_SECONDS,
    OTHER_HOST_AFTER_SECONDS,
    OWNER_FILE,
    _start_time,
    claim_scratch,
    sweep_scratch,
)

JOB = "ftjob-01testjob"


def _attempt(scratch: Path, name: str = "attempt-1", job: str = JOB) -> Path:
    folder = scratch / job / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "training.log").write_text("step 1\n")
    return folder


def _own(folder: Path, pid: int, *, host: str | None = None, started: int | None = None) -> None:
    owner = {"host": host or socket.gethostname(), "pid": pid, "started": started}
    (folder / OWNER_FILE).write_text(json.dumps(owner))


def _age(folder: Path, seconds: float) -> None:
    past = time.time() - seconds
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (past, past))


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_folder_of_a_dead_process_is_deleted(tmp_path: Path, dead_pid: int) -> None:
    folder = _attempt(tmp_path)
    _own(folder, dead_pid)

    assert sweep_scratch(tmp_path) == [folder]
    assert not folder.exists()
    assert not (tmp_path / JOB).exists()  # the job folder, left empty


def test_the_folder_of_a_live_process_is_kept(tmp_path: Path, dead_pid: int) -> None:
    live = _attempt(tmp_path, "attempt-2")
    claim_scratch(live)
    dead = _attempt(tmp_path, "attempt-1")
    _own(dead, dead_pid)
    _age(live, 2 * ORPHAN_AFTER_SECONDS)  # however old: its owner is alive

    assert sweep_scratch(tmp_path) == [dead]
    assert (live / "training.log").exists()


@pytest.mark.skipif(_start_time(os.getpid()) is None, reason="needs /proc")
def test_a_pid_now_used_by_another_process_does_not_keep_a_folder(tmp_path: Path) -> None:
    """A restarted container's worker often gets the pid its killed predecessor had."""
    folder = _attempt(tmp_path)
    started = _start_time(os.getpid())
    assert started is not None
    _own(folder, os.getpid(), started=started - 1)

    assert sweep_scratch(tmp_path) == [folder]


def test_a_folder_owned_on_another_host_is_kept_while_it_may_be_in_use(
    tmp_path: Path, dead_pid: int
) -> None:
    recent = _attempt(tmp_path, "attempt-2")
    _own(recent, dead_pid, host="another-host")
    _age(recent, 2 * ORPHAN_AFTER_SECONDS)
    # A container recreated under another name left this one on a volume that was kept.
    stale = _attempt(tmp_path, "attempt-1")
    _own(stale, dead_pid, host="a-container-long-gone")
    _age(stale, OTHER_HOST_AFTER_SECONDS + 60)

    assert sweep_scratch(tmp_path) == [stale]
    assert recent.exists() and not stale.exists()


def test_a_folder_without_an_owner_is_deleted_only_once_it_is_old(tmp_path: Path) -> None:
    fresh = _attempt(tmp_path, "attempt-2")
    old = _attempt(tmp_path, "attempt-1")
    _age(old, ORPHAN_AFTER_SECONDS + 60)
    _age(fresh, ORPHAN_AFTER_SECONDS + 60)
    (fresh / "training.log").write_text("step 2\n")  # written to just now

    assert sweep_scratch(tmp_path) == [old]
    assert fresh.exists()


def test_what_is_not_an_attempt_folder_is_never_touched(tmp_path: Path, dead_pid: int) -> None:
    """A scratch folder set to the data folder holds the caches too."""
    others = [
        tmp_path / "cache" / "tokenized" / "attempt-1",
        tmp_path / "model-cache" / "attempt-1",
        tmp_path / JOB / "resume-notes",
    ]
    for folder in others:
        folder.mkdir(parents=True)
        _own(folder, dead_pid)
        _age(folder, 2 * ORPHAN_AFTER_SECONDS)

    assert sweep_scratch(tmp_path) == []
    assert all(folder.exists() for folder in others)


def test_a_worker_sweeps_its_scratch_when_it_starts(
    tmp_path: Path, dead_pid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import celery_app
    from workers.settings import WorkerSettings

    monkeypatch.setattr(celery_app, "_context", None)
    settings = WorkerSettings(
        data_dir=tmp_path / "data",
        broker_url="embedded",
        secret_key="test-secret-key-" + "x" * 24,
    )
    folder = _attempt(settings.scratch)
    _own(folder, dead_pid)

    celery_app.create_worker_app(settings)
    try:
        assert not folder.exists()
    finally:
        celery_app.context().engine.dispose()

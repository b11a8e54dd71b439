"""What training attempts leave behind: checkpoint objects in storage, scratch folders on disk.

Storage: a checkpoint's row is deleted (in a fenced transaction) before its objects, so a row
never points at deleted objects; objects that no row points at (an upload refused or failed,
an attempt that died) are harmless and are swept once the job has ended.

Disk: each attempt's scratch folder names its owner (host, pid and the process's start time);
a worker starting on a host deletes the folders whose owner is dead. The tokenized-dataset and
base-model caches live elsewhere under the data folder and are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from common import ids
from common.jobs import TERMINAL_STATUSES
from common.storage import ObjectStorage
from models_db.session import transaction
from workers.context import WorkerContext
from workers.jobs import repository as repo

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
"""Written into each attempt's scratch folder: who is using it."""

ORPHAN_AFTER_SECONDS = 3600
"""A scratch folder that names no owner is deleted once nothing in it changed for this long."""

OTHER_HOST_AFTER_SECONDS = 7 * 24 * 3600
"""A folder owned on another host (a container recreated under a new name, on a volume kept)
is deleted once nothing in it changed for this long: a live attempt writes its log every step."""

_ATTEMPT_FOLDER = re.compile(r"attempt-\d+")


# -- object storage ----------------------------------------------------------------------------


def checkpoints_root(tenant_id: str, job_id: str) -> str:
    """The folder in storage under which every attempt of the job uploads its checkpoints."""
    return f"tenants/{tenant_id}/jobs/{job_id}/checkpoints"


def delete_folder(storage: ObjectStorage, prefix: str) -> None:
    """Best effort: a folder left behind is only wasted space, swept when the job ends."""
    try:
        storage.delete_prefix(f"{prefix}/")
    except Exception:
        log.warning("could not delete %s", prefix, exc_info=True)


def adapters_root(tenant_id: str, job_id: str) -> str:
    """The folder in storage under which each attempt of the job uploads its adapter (``aN``)."""
    return f"tenants/{tenant_id}/models/{job_id}"


def sweep_unreferenced(ctx: WorkerContext, tenant_id: str, job_id: str) -> int:
    """Delete the checkpoint and adapter folders of an ended job that no row points at (uploads
    of attempts that died or were fenced out); returns how many.

    Only once the job has ended: no attempt can record a checkpoint or publish after that (both
    are fenced by the `running` status), so the rows read here are final.
    """
    with transaction(ctx.session_factory) as session:
        if repo.job_status(session, job_id) not in TERMINAL_STATUSES:
            return 0
        referenced = repo.checkpoint_prefixes(session, job_id) | repo.adapter_prefixes(
            session, job_id
        )
    removed = 0
    for root in (checkpoints_root(tenant_id, job_id), adapters_root(tenant_id, job_id)):
        keys = ctx.storage.list_keys(f"{root}/")
        for folder in sorted({key[len(root) + 1 :].split("/", 1)[0] for key in keys}):
            if f"{root}/{folder}" not in referenced:
                ctx.storage.delete_prefix(f"{root}/{folder}/")
                removed += 1
    if removed:
        log.info("job %s: deleted %d folder(s) no row points at", job_id, removed)
    return removed


def sweep_ended_job(ctx: WorkerContext, job_id: str) -> int:
    """The ``sweep_job`` task (common.job_endings): sweep_unreferenced for a job named by id."""
    with transaction(ctx.session_factory) as session:
        tenant_id = repo.tenant_of(session, job_id)
    return 0 if tenant_id is None else sweep_unreferenced(ctx, tenant_id, job_id)


# -- scratch folders ---------------------------------------------------------------------------


def claim_scratch(folder: Path) -> None:
    """Mark ``folder`` as this process's, so that no worker starting meanwhile deletes it."""
    pid = os.getpid()
    owner = {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}
    (folder / OWNER_FILE).write_text(json.dumps(owner))


def sweep_scratch(scratch: Path) -> list[Path]:
    """Delete the attempt folders (``JOB/attempt-N``) that no live process on this host owns,
    and job folders left empty; returns the attempt folders deleted.

    A folder owned on another host (a shared volume) is kept while anything in it changed in
    the last week: its pid means nothing here.
    """
    removed: list[Path] = []
    if not scratch.is_dir():
        return removed
    for job_dir in sorted(scratch.iterdir()):
        if not (job_dir.name.startswith(ids.JOB) and job_dir.is_dir()):
            continue
        try:
            attempts = sorted(job_dir.iterdir())
        except OSError:  # deleted meanwhile by another worker's sweep
            continue
        for attempt in attempts:
            if _ATTEMPT_FOLDER.fullmatch(attempt.name) and attempt.is_dir() and _abandoned(attempt):
                shutil.rmtree(attempt, ignore_errors=True)
                removed.append(attempt)
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # only when empty
    if removed:
        log.info("deleted %d scratch folder(s) of dead training processes", len(removed))
    return removed


def _abandoned(folder: Path) -> bool:
    owner = _read_owner(folder / OWNER_FILE)
    if owner is None:
        # Killed before it wrote its owner file, or written by an older version.
        return _newest_mtime(folder) < time.time() - ORPHAN_AFTER_SECONDS
    if owner.get("host") != socket.gethostname():
        return _newest_mtime(folder) < time.time() - OTHER_HOST_AFTER_SECONDS
    pid, started = owner.get("pid"), owner.get("started")
    if not isinstance(pid, int) or pid <= 0:
        return _newest_mtime(folder) < time.time() - ORPHAN_AFTER_SECONDS
    return not _alive(pid, started if isinstance(started, int) else None)


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    # A live pid may be a new process that reuses the number (a restarted container's worker
    # often has the same small pid): then the start time differs.
    now_started = _start_time(pid)
    return started is None or now_started is None or now_started == started


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) is in parentheses and may contain spaces.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _newest_mtime(folder: Path) -> float:
    newest = 0.0
    for path in [folder, *folder.rglob("*")]:
        try:
            newest = max(newest, path.lstat().st_mtime)
        except OSError:
            continue
    return newest

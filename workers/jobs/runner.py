"""Running claimed jobs: prepare the spec, supervise the training subprocess, finish.

A job is three kinds of short transactions around work done with no session open: the claim,
heartbeats (flags, buffered metric events, checkpoints), and the finish (publish.py for a
trained adapter). Every write is fenced by the claim's attempt number
(workers.jobs.repository); a thread keeps the lease alive meanwhile (lease.py).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from common import ids
from common.jobs import JobStatus
from common.storage import StorageError
from models_db.models import BaseModel, FineTuningJob, JobCheckpoint
from models_db.session import transaction
from workers.context import WorkerContext
from workers.jobs import repository as repo
from workers.jobs.artifacts import (
    ArtifactCorrupt,
    ArtifactMissing,
    download_folder,
    upload_folder,
)
from workers.jobs.cleanup import (
    checkpoints_root,
    claim_scratch,
    delete_folder,
    sweep_unreferenced,
)
from workers.jobs.lease import LeaseKeeper
from workers.jobs.models import local_model_path
from workers.jobs.publish import Publication
from workers.jobs.subprocess_io import TrainingProcess, redact_paths
from workers.jobs.validation import local_tokenized

log = logging.getLogger(__name__)

EXIT_GRACE_SECONDS = 60.0
"""How long a training process may go on after reporting its result before it is stopped."""


def run_available_jobs(ctx: WorkerContext, max_jobs: int | None = None) -> int:
    """Claim and run jobs until none is claimable (or ``max_jobs`` ran); returns the count."""
    ran = 0
    while max_jobs is None or ran < max_jobs:
        with transaction(ctx.session_factory) as session:
            claim = repo.claim_next(session, ctx.settings.worker_id, ctx.settings.lease_seconds)
            if claim is not None:
                # Which worker is for the operators (the job row, the logs), not the tenant.
                log.info(
                    "job %s attempt %s claimed by %s",
                    claim.job_id,
                    claim.attempt,
                    ctx.settings.worker_id,
                )
                repo.add_event(
                    session, claim, f"Fine-tuning job started (attempt {claim.attempt})."
                )
        if claim is None:
            return ran
        JobRun(ctx, claim).run()
        ran += 1
    return ran


@dataclass(frozen=True)
class _Stored:
    """A recorded checkpoint, as read before the session closed."""

    id: str
    step: int
    prefix: str
    manifest_sha256: str


@dataclass
class _Outcome:
    started: bool = False
    done: dict[str, Any] | None = None
    paused_step: int | None = None
    error: str | None = None
    total_steps: int | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def reported_result(self) -> bool:
        """The child said how it ended (``done`` or ``paused``)."""
        return self.done is not None or self.paused_step is not None


class JobRun:
    def __init__(self, ctx: WorkerContext, claim: repo.Claim) -> None:
        self.ctx = ctx
        self.claim = claim
        self.settings = ctx.settings
        self.workdir = self.settings.scratch / claim.job_id / f"attempt-{claim.attempt}"
        self._pending_events: list[dict[str, Any]] = []
        # Folders of this machine that failure messages must not show the tenant (found by
        # their exact text, so that a name with a space in it is redacted whole).
        self._private_folders: set[str] = {
            str(self.settings.data_dir),
            str(self.settings.scratch),
            sys.prefix,
            sys.base_prefix,
            tempfile.gettempdir(),
        }
        # Extends the lease from a thread while this one downloads, uploads or waits.
        self.lease = LeaseKeeper(
            ctx.session_factory,
            claim,
            lease_seconds=self.settings.lease_seconds,
            interval=self.settings.heartbeat_seconds,
        )

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            with self.lease:
                if self._stopped_before_start():
                    return
                spec_path = self._prepare()
                if self._stopped_before_start():  # asked for while the inputs were downloading
                    return
                self._supervise(spec_path)
        except repo.LostJob:
            log.warning("job %s attempt %s was taken over; stopping", *self._ids())
        except Exception as exc:
            log.exception("job %s attempt %s failed", *self._ids())
            # The tenant sees the kind of failure; the detail (hosts, buckets, paths) is in the
            # worker's log under the job id.
            self._attempt_failed(f"internal error ({type(exc).__name__}); details are in the logs")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._sweep_if_ended()

    def _sweep_if_ended(self) -> None:
        """Once the job has ended (however), delete the checkpoint folders no row points at:
        uploads of attempts that died or were fenced out."""
        try:
            sweep_unreferenced(self.ctx, self.claim.tenant_id, self.claim.job_id)
        except Exception:
            log.warning("job %s: checkpoint sweep failed", self.claim.job_id, exc_info=True)

    def _ids(self) -> tuple[str, int]:
        return self.claim.job_id, self.claim.attempt

    # -- preparation -----------------------------------------------------------------------

    def _stopped_before_start(self) -> bool:
        """A cancel or pause that is pending before the training process starts ends the
        attempt here (paused: the latest recorded checkpoint is where a resume continues)."""
        with transaction(self.ctx.session_factory) as session:
            flags = repo.touch(session, self.claim, self.settings.lease_seconds)
            if flags.cancel_requested:
                repo.finish(session, self.claim, JobStatus.CANCELLED)
                repo.add_event(session, self.claim, repo.CANCELLED_MESSAGE)
            elif flags.pause_requested:
                repo.finish(session, self.claim, JobStatus.PAUSED)
                repo.add_event(
                    session,
                    self.claim,
                    "Job paused before training started; resume it to continue from its last "
                    "checkpoint.",
                )
            else:
                return False
        return True

    def _prepare(self) -> Path:
        from workers.training.spec import TrainingSpec

        with transaction(self.ctx.session_factory) as session:
            job = session.get(FineTuningJob, self.claim.job_id)
            assert job is not None and job.artifacts is not None
            base = session.get(BaseModel, job.base_model_id)
            assert base is not None
            checkpoints = [
                _Stored(c.id, c.step, c.storage_prefix, c.manifest_sha256)
                for c in repo.checkpoints_newest_first(session, job.id)
            ]
            method_type = job.method["type"]
            params = dict(job.method[method_type]["hyperparameters"])
            artifacts = dict(job.artifacts)
            seed, base_name, base_source = job.seed, base.id, base.source

        self.workdir.mkdir(parents=True, exist_ok=True)
        claim_scratch(self.workdir)
        resume_dir = self._download_resume(checkpoints)
        spec = TrainingSpec(
            method="sft" if method_type == "supervised" else "dpo",
            base_model_path=local_model_path(self.settings, base_name, base_source),
            base_model_name=base_name,
            train_data=str(local_tokenized(self.ctx, artifacts["train"])),
            valid_data=(
                str(local_tokenized(self.ctx, artifacts["valid"]))
                if artifacts.get("valid")
                else None
            ),
            output_dir=str(self.workdir / "adapter"),
            checkpoint_dir=str(self.workdir / "checkpoints"),
            resume_from=str(resume_dir) if resume_dir else None,
            seed=seed,
            n_epochs=int(params["n_epochs"]),
            batch_size=int(params["batch_size"]),
            learning_rate=float(params["learning_rate"]),
            lora_rank=int(params["lora_rank"]),
            lora_alpha=int(params["lora_alpha"]),
            lora_dropout=float(params["lora_dropout"]),
            target_modules=params["target_modules"],
            use_dora=bool(params["use_dora"]),
            quantization=params["quantization"],
            max_seq_len=int(artifacts["max_seq_len"]),
            packing=bool(params.get("packing", method_type == "supervised")),
            beta=float(params.get("beta") or 0.1),
            checkpoint_every_steps=self.settings.checkpoint_every_steps,
            nproc=self.settings.train_nproc,
            parallelism=self.settings.train_parallelism,
            parity_messages=(
                artifacts["train"].get("parity_prompt")
                if self.settings.gateway_url and self.settings.parity_check
                else None
            ),
        )
        if Path(spec.base_model_path).is_absolute():  # not a hub id
            self._private_folders.add(spec.base_model_path)
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(spec.to_json())
        return spec_path

    def _download_resume(self, checkpoints: list[_Stored]) -> Path | None:
        """The newest recorded checkpoint that is intact, downloaded; None: start at step 0.

        Corrupt or missing ones are skipped, then deleted. A storage error is not a reason to
        skip one (an older checkpoint would throw away the steps after it): it fails the
        attempt, which is tried again.
        """
        resume_dir = self.workdir / "resume"
        skipped: list[tuple[_Stored, str]] = []
        for checkpoint in checkpoints:
            shutil.rmtree(resume_dir, ignore_errors=True)
            try:
                download_folder(
                    self.ctx.storage,
                    checkpoint.prefix,
                    resume_dir,
                    expected_sha256=checkpoint.manifest_sha256,
                )
            except ArtifactCorrupt as exc:
                if isinstance(exc, ArtifactMissing) and not self._store_shows_checkpoints():
                    # Not one object of the job's checkpoints is visible although rows say
                    # they were written: a store misconfigured or not mounted, not lost
                    # checkpoints. Discarding them would throw their rows away for good.
                    raise StorageError(
                        f"no checkpoint of job {self.claim.job_id} is visible in storage"
                    ) from exc
                log.warning(
                    "job %s: checkpoint at step %s unusable: %s",
                    self.claim.job_id,
                    checkpoint.step,
                    exc,
                )
                kind = "missing" if isinstance(exc, ArtifactMissing) else "corrupt"
                skipped.append((checkpoint, kind))
                continue
            self._discard_checkpoints(skipped, resumed=True)
            return resume_dir
        shutil.rmtree(resume_dir, ignore_errors=True)
        self._discard_checkpoints(skipped, resumed=False)
        return None

    def _store_shows_checkpoints(self) -> bool:
        root = checkpoints_root(self.claim.tenant_id, self.claim.job_id)
        return bool(self.ctx.storage.list_keys(f"{root}/"))

    def _discard_checkpoints(self, skipped: list[tuple[_Stored, str]], *, resumed: bool) -> None:
        """Delete the rows of unusable checkpoints (so that the steps trained again can be
        recorded), tell the tenant which and why in a word, then delete their objects."""
        if not skipped:
            return
        with transaction(self.ctx.session_factory) as session:
            repo.touch(session, self.claim, self.settings.lease_seconds)
            repo.delete_checkpoints(session, self.claim, [c.id for c, _ in skipped])
            for checkpoint, kind in skipped:
                repo.add_event(
                    session,
                    self.claim,
                    f"The checkpoint at step {checkpoint.step} could not be used ({kind}) and "
                    "was discarded.",
                    level="warn",
                )
            if not resumed:
                repo.add_event(
                    session,
                    self.claim,
                    "No usable checkpoint is left; training starts again from step 0.",
                    level="warn",
                )
        for checkpoint, _kind in skipped:
            delete_folder(self.ctx.storage, checkpoint.prefix)

    # -- supervision -----------------------------------------------------------------------

    def _supervise(self, spec_path: Path) -> None:
        from workers.training.launcher import launch_command

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = TrainingProcess(
            launch_command(str(spec_path), self.settings.train_nproc),
            log_path=self.workdir / "training.log",
            env=env,
        )
        outcome = _Outcome()
        pause_sent = False
        stalled = False
        next_beat = time.monotonic()
        try:
            while True:
                timeout = max(0.0, next_beat - time.monotonic())
                try:
                    event = proc.events.get(timeout=timeout)
                except queue.Empty:
                    event = {}
                if event is None:
                    break
                if event:
                    self._handle(event, outcome)
                if self.lease.lost.is_set():
                    raise repo.LostJob(self.claim.job_id)
                if time.monotonic() >= next_beat:
                    flags = self._heartbeat_or_lease_flags()
                    next_beat = time.monotonic() + self.settings.heartbeat_seconds
                    if flags.cancel_requested:
                        proc.stop(self.settings.cancel_grace_seconds)
                        self._finish_cancelled()
                        return
                    # Only once the child said it started: its handler is installed by then,
                    # and SIGUSR1's default action, before that, is to end the process.
                    if flags.pause_requested and outcome.started and not pause_sent:
                        proc.signal(signal.SIGUSR1)
                        pause_sent = True
                if self._ended_but_still_running(proc, outcome):
                    proc.stop(self.settings.cancel_grace_seconds)
                    break
                if self._stalled(proc, outcome):
                    proc.stop(self.settings.cancel_grace_seconds)
                    stalled = True
                    break
        except BaseException:
            proc.stop(self.settings.cancel_grace_seconds)
            raise
        code = proc.wait(EXIT_GRACE_SECONDS)
        # Flush buffered events (raises LostJob if fenced out meanwhile); a cancel that came
        # in while the child was finishing wins over whatever it finished with.
        if self._last_heartbeat().cancel_requested:
            self._finish_cancelled()
        elif stalled:
            self._attempt_failed(
                f"training made no progress for {self.settings.stall_timeout_seconds:g} s; "
                "the process was stopped"
            )
        # `done` comes after the adapter is written (and every process is past the barrier),
        # `paused` after the checkpoint: what the process does after that (a collective that
        # hangs at shutdown, a crash on exit) cannot spoil them.
        elif outcome.done is not None:
            self._log_exit_after_end(code)
            self._publish(outcome)
        elif outcome.paused_step is not None:
            self._log_exit_after_end(code)
            self._finish_paused(outcome.paused_step)
        else:
            reason = outcome.error or f"training process exited with code {code}"
            if outcome.error is None and (tail := proc.stderr_tail()):
                reason += f": {tail.splitlines()[-1][:500]}"
            # The tenant reads this: the worker's folders are replaced, the error is kept.
            self._attempt_failed(redact_paths(reason, self.workdir, self._private_folders))

    def _ended_but_still_running(self, proc: TrainingProcess, outcome: _Outcome) -> bool:
        """Whether the child reported its end (``done``/``paused``) but has gone on running,
        silent, for ``EXIT_GRACE_SECONDS``: it is then stopped and its result used."""
        return outcome.reported_result and proc.silent_for() >= EXIT_GRACE_SECONDS

    def _log_exit_after_end(self, code: int) -> None:
        if code != 0:
            log.warning(
                "job %s attempt %s: the training process exited with %s after its result",
                *self._ids(),
                code,
            )

    def _stalled(self, proc: TrainingProcess, outcome: _Outcome) -> bool:
        """Whether the child has sent no event for the stall timeout. Any event is progress:
        it reports every optimizer step and, in a long evaluation, every ~30 s; before its
        ``started`` the limit covers loading the model. A pause needs no exception: the child
        then writes its checkpoint and exits, reporting as it goes."""
        limit = self.settings.stall_timeout_seconds
        if outcome.reported_result:
            return False  # its result is in: see _ended_but_still_running
        if limit <= 0 or proc.silent_for() < limit:
            return False
        log.warning(
            "job %s attempt %s: no event from the training process for %.0f s; stopping it",
            *self._ids(),
            proc.silent_for(),
        )
        return True

    def _handle(self, event: dict[str, Any], outcome: _Outcome) -> None:
        kind = event.get("type")
        if kind == "started":
            outcome.started = True
            outcome.total_steps = event.get("total_steps")
            resumed = event.get("resumed_from_step")
            text = (
                f"Resumed training from the checkpoint at step {resumed}."
                if resumed
                else f"Training started: {outcome.total_steps} steps."
            )
            self._pending_events.append({"message": text, "data": _clean(event)})
        elif kind == "metrics":
            data = {**_clean(event), "total_steps": outcome.total_steps}
            outcome.last_metrics.update(data)
            loss = event.get("train_loss")
            loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else "n/a"
            self._pending_events.append(
                {
                    "message": f"Step {event.get('step')}/{outcome.total_steps}: "
                    f"training loss={loss_text}",
                    "type": "metrics",
                    "data": data,
                }
            )
        elif kind == "eval":
            outcome.last_metrics.update(_clean(event))
            self._pending_events.append(
                {
                    "message": f"Step {event.get('step')}: validation loss="
                    f"{event.get('valid_loss')}",
                    "type": "metrics",
                    "data": _clean(event),
                }
            )
        elif kind == "checkpoint":
            self._record_checkpoint(int(event["step"]), Path(event["path"]), event, outcome)
        elif kind == "done":
            outcome.done = event
        elif kind == "paused":
            outcome.paused_step = int(event.get("step", 0))
        elif kind == "error":
            outcome.error = str(event.get("message", "training failed"))[:1000]
        # "heartbeat" needs nothing here: any event tells the watchdog the child is alive.

    def _heartbeat_or_lease_flags(self) -> repo.Flags:
        """A heartbeat that may fail for a while (a database failover): the events stay
        buffered, and the lease thread decides when the attempt has to be given up."""
        try:
            return self._heartbeat()
        except repo.LostJob:
            raise
        except Exception:
            log.warning("job %s attempt %s: heartbeat failed", *self._ids(), exc_info=True)
            return self.lease.flags

    def _last_heartbeat(self) -> repo.Flags:
        """The heartbeat after the child exited, tried again while the lease lasts."""
        while True:
            try:
                return self._heartbeat()
            except repo.LostJob:
                raise
            except Exception:
                if self.lease.lost.is_set():
                    raise repo.LostJob(self.claim.job_id) from None
                log.warning("job %s attempt %s: heartbeat failed", *self._ids(), exc_info=True)
                time.sleep(self.settings.heartbeat_seconds)

    def _heartbeat(self) -> repo.Flags:
        with transaction(self.ctx.session_factory) as session:
            flags = repo.touch(session, self.claim, self.settings.lease_seconds)
            for pending in self._pending_events:
                repo.add_event(
                    session,
                    self.claim,
                    pending["message"],
                    level=pending.get("level", "info"),
                    type_=pending.get("type", "message"),
                    data=pending.get("data"),
                )
        self._pending_events.clear()
        return flags

    def _record_checkpoint(
        self, step: int, path: Path, event: dict[str, Any], outcome: _Outcome
    ) -> None:
        try:
            self._save_checkpoint(step, path, event, outcome)
        finally:
            # The trainer writes every checkpoint to a folder of its own and never reads it
            # again: once uploaded and recorded (or given up on) it would only fill the disk.
            shutil.rmtree(path, ignore_errors=True)

    def _save_checkpoint(
        self, step: int, path: Path, event: dict[str, Any], outcome: _Outcome
    ) -> None:
        job_id, attempt = self._ids()
        prefix = f"{checkpoints_root(self.claim.tenant_id, job_id)}/step-{step}-a{attempt}"
        metrics = {
            k: v
            for k, v in (event.get("metrics") or outcome.last_metrics).items()
            if isinstance(v, int | float) and k != "step"
        }
        recording = False
        try:
            _manifest, digest = upload_folder(
                self.ctx.storage, path, prefix, {"job_id": job_id, "step": step, "attempt": attempt}
            )
            recording = True
            with transaction(self.ctx.session_factory) as session:
                repo.touch(session, self.claim, self.settings.lease_seconds)
                session.add(
                    JobCheckpoint(
                        id=ids.new_id(ids.CHECKPOINT),
                        tenant_id=self.claim.tenant_id,
                        job_id=job_id,
                        step=step,
                        storage_prefix=prefix,
                        manifest_sha256=digest,
                        metrics=metrics,
                    )
                )
                session.flush()
                superseded = repo.drop_old_checkpoints(
                    session, self.claim, self.settings.checkpoint_keep
                )
                repo.add_event(session, self.claim, f"Checkpoint saved at step {step}.")
        except repo.LostJob:
            delete_folder(self.ctx.storage, prefix)  # fenced out: no row points at it
            raise
        except IntegrityError:
            log.info("checkpoint at step %s of %s already recorded", step, job_id)
            delete_folder(self.ctx.storage, prefix)
        except Exception as exc:
            # A missing checkpoint costs only the steps since the one before; the run goes on.
            log.warning("job %s: checkpoint at step %s not saved", job_id, step, exc_info=True)
            if not recording or self._unrecorded(prefix):
                delete_folder(self.ctx.storage, prefix)
            self._pending_events.append(
                {
                    "message": f"The checkpoint at step {step} could not be saved "
                    f"({type(exc).__name__}); training goes on, and a resume would start from "
                    "the checkpoint before it.",
                    "level": "warn",
                }
            )
        else:
            # The rows are gone (committed): now their objects, which nothing points at.
            for old in superseded:
                delete_folder(self.ctx.storage, old)

    def _unrecorded(self, prefix: str) -> bool:
        """Whether no row points at ``prefix``, after a recording that failed: its commit may
        have gone through with only the answer lost. False when that cannot be told."""
        try:
            with transaction(self.ctx.session_factory) as session:
                return prefix not in repo.checkpoint_prefixes(session, self.claim.job_id)
        except Exception:
            log.warning(
                "job %s: cannot tell whether %s is recorded",
                self.claim.job_id,
                prefix,
                exc_info=True,
            )
            return False

    # -- endings ---------------------------------------------------------------------------

    def _publish(self, outcome: _Outcome) -> None:
        assert outcome.done is not None
        Publication(self.ctx, self.claim, outcome.done).run()

    def _finish_paused(self, step: int) -> None:
        with transaction(self.ctx.session_factory) as session:
            status = repo.finish(session, self.claim, JobStatus.PAUSED)
            repo.add_event(
                session,
                self.claim,
                repo.CANCELLED_MESSAGE
                if status == JobStatus.CANCELLED
                else f"Job paused at step {step}; resume it to continue.",
            )

    def _finish_cancelled(self) -> None:
        with transaction(self.ctx.session_factory) as session:
            repo.finish(session, self.claim, JobStatus.CANCELLED)
            repo.add_event(session, self.claim, repo.CANCELLED_MESSAGE)

    def _attempt_failed(self, reason: str) -> None:
        try:
            with transaction(self.ctx.session_factory) as session:
                job = session.get(FineTuningJob, self.claim.job_id)
                assert job is not None
                # Failures are counted apart from `attempt`, which pauses and resumes raise too.
                failures = job.failed_attempts + 1
                counted = {"failed_attempts": FineTuningJob.failed_attempts + 1}
                failed = (
                    f"Attempt {job.attempt} failed ({failures} of {job.max_attempts} allowed "
                    f"failures): {reason}."
                )
                if failures >= job.max_attempts:
                    status = repo.finish(
                        session,
                        self.claim,
                        JobStatus.FAILED,
                        error={"code": "training_failed", "message": reason, "param": None},
                        **counted,
                    )
                    then = "The job has failed."
                elif job.pause_requested_at is not None:
                    # Paused rather than retried: the tenant asked for it, and a retry would
                    # only be stopped again.
                    status = repo.finish(session, self.claim, JobStatus.PAUSED, **counted)
                    then = (
                        "The job is paused as requested; resume it to retry from its last "
                        "checkpoint."
                    )
                else:
                    status = repo.finish(session, self.claim, JobStatus.QUEUED, **counted)
                    then = "Retrying."
                if status == JobStatus.CANCELLED:
                    then = "The job is cancelled as requested; no model was published."
                elif status == JobStatus.QUEUED:
                    repo.enqueue_wakeup(session, self.claim.tenant_id, self.claim.job_id)
                level = "error" if status == JobStatus.FAILED else "warn"
                repo.add_event(session, self.claim, f"{failed} {then}", level=level)
        except repo.LostJob:
            log.warning("job %s attempt %s: failure not recorded, attempt superseded", *self._ids())


def _clean(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "type" and v is not None}

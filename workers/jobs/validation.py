"""The validation stage: tokenize the job's files with the base model's tokenizer, count
tokens, apply max_seq_len, resolve "auto" hyperparameters, then queue the job.

Tokenized data is cached in object storage under a key made of (file sha256, tokenizer
fingerprint, max_seq_len, method, overflow policy): a retry, another worker, or a second job on
the same file reuses it instead of tokenizing again.

The stage is claimed like a training attempt: a lease (kept alive by a thread while it works)
and the attempt number as fencing token, so a duplicate message does nothing while a worker
validates, and the reaper sends the message again when the worker died or the message was
lost. A file that is wrong fails the job at once; any other error (storage, database, a crash)
is tried again, and fails the job with a plain message after max_attempts failures.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session

from common.datasets import DatasetError, iter_examples, parity_prompt
from common.datasets.validator import Example
from common.job_endings import job_ended
from common.jobs import TERMINAL_STATUSES, JobStatus
from common.storage import ObjectNotFound
from models_db.base import now_ts
from models_db.models import BaseModel, File, FineTuningJob
from models_db.session import transaction
from workers.context import WorkerContext
from workers.jobs import repository as repo
from workers.jobs.lease import LeaseKeeper
from workers.jobs.models import BaseModelUnavailable, local_model_path
from workers.jobs.repository import add_event, enqueue_wakeup
from workers.training.hparams import resolve_auto

log = logging.getLogger(__name__)

AUTO_MAX_SEQ_LEN = 2048
INTERNAL_ERROR_MESSAGE = (
    "Your files could not be validated because of an internal error, on each of {n} tries. "
    "Nothing is wrong with them as far as we know; please create the job again later."
)


class ValidationFailed(Exception):
    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class TokenizedArtifact:
    storage_key: str
    examples: int
    total_tokens: int
    trained_tokens: int
    truncated: list[int]
    rejected: list[int]
    # The first example's prompt, for the train/serve parity check (None: not covered).
    parity_prompt: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class _JobSnapshot:
    job_id: str
    tenant_id: str
    method: dict[str, Any]
    base_name: str
    base_source: str
    context_length: int
    files: dict[str, tuple[str, str, str] | None]  # param -> (file id, sha256, storage key)


def _snapshot(ctx: WorkerContext, claim: repo.Claim) -> _JobSnapshot:
    with transaction(ctx.session_factory) as session:
        repo.touch(session, claim, ctx.settings.lease_seconds)
        job = session.get(FineTuningJob, claim.job_id)
        assert job is not None
        base = session.get(BaseModel, job.base_model_id)
        assert base is not None
        files: dict[str, tuple[str, str, str] | None] = {}
        for param, file_id in (
            ("training_file", job.training_file_id),
            ("validation_file", job.validation_file_id),
        ):
            row = session.get(File, file_id) if file_id else None
            if file_id and (row is None or row.deleted_at is not None):
                files[param] = (file_id, "", "")  # deleted: reported below
            else:
                files[param] = (row.id, row.sha256, row.storage_key) if row else None
        return _JobSnapshot(
            job.id,
            job.tenant_id,
            copy.deepcopy(job.method),
            base.id,
            base.source,
            base.context_length,
            files,
        )


def _tokenized(
    ctx: WorkerContext,
    file: tuple[str, str, str],
    model_path: str,
    *,
    method: Literal["sft", "dpo"],
    max_seq_len: int,
    param: str,
) -> TokenizedArtifact:
    from workers.training.data import tokenize_to_file, tokenizer_fingerprint

    file_id, sha256, storage_key = file
    if not sha256:
        raise ValidationFailed(f"File {file_id} was deleted.", "invalid_file", param)
    overflow = ctx.settings.on_overflow
    fingerprint = tokenizer_fingerprint(model_path)
    key = hashlib.sha256(
        f"{sha256}|{fingerprint}|{max_seq_len}|{method}|{overflow}".encode()
    ).hexdigest()
    data_key, stats_key = f"cache/tokenized/{key}.safetensors", f"cache/tokenized/{key}.json"
    local = ctx.settings.data_dir / "cache" / "tokenized" / f"{key}.safetensors"
    try:
        stats = json.loads(ctx.storage.get_bytes(stats_key))
        return TokenizedArtifact(storage_key=data_key, **stats)
    except ObjectNotFound:
        pass
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        first: list[list[dict[str, Any]] | None] = []

        def remember_first(examples: Iterator[Example]) -> Iterator[Example]:
            for fmt, record in examples:
                if not first:
                    first.append(parity_prompt(fmt, record))
                yield fmt, record

        records = remember_first(iter_examples(ctx.storage.open_stream(storage_key)))
        result = tokenize_to_file(
            records,
            model_path,
            str(local),
            method=method,
            max_seq_len=max_seq_len,
            on_overflow=overflow,
        )
    except ObjectNotFound as err:  # no retry brings the bytes back
        raise ValidationFailed(
            f"The contents of file {file_id} are missing from storage; upload it again and "
            "create a new job.",
            "invalid_file",
            param,
        ) from err
    except DatasetError as err:
        raise ValidationFailed(f"{file_id}: {err.message}", err.code, param) from err
    except ValueError as err:  # the tokenizer refused the data (e.g. every example rejected)
        raise ValidationFailed(f"{file_id}: {err}", "invalid_file", param) from err
    artifact = TokenizedArtifact(
        storage_key=data_key,
        examples=result.examples,
        total_tokens=result.total_tokens,
        trained_tokens=result.trained_tokens,
        truncated=list(result.truncated),
        rejected=list(result.rejected),
        parity_prompt=first[0] if first else None,
    )
    if artifact.examples == 0:
        raise ValidationFailed(
            f"{file_id}: no example is left to train on after tokenization (too long, or "
            "nothing with weight 1).",
            "no_trainable_examples",
            param,
        )
    if artifact.rejected and overflow == "reject":
        shown = ", ".join(f"#{i + 1}" for i in artifact.rejected[:20])
        raise ValidationFailed(
            f"{file_id}: {len(artifact.rejected)} example(s) are longer than max_seq_len="
            f"{max_seq_len} tokens: {shown}.",
            "examples_too_long",
            param,
        )
    ctx.storage.put_file(data_key, local)
    stats = {k: v for k, v in asdict(artifact).items() if k != "storage_key"}
    ctx.storage.put_bytes(stats_key, json.dumps(stats).encode())
    return artifact


def _fail(ctx: WorkerContext, claim: repo.Claim, failure: ValidationFailed) -> None:
    with transaction(ctx.session_factory) as session:
        job = _owned(session, ctx, claim)
        _end(job, JobStatus.FAILED)
        job.error = {"code": failure.code, "message": failure.message, "param": failure.param}
        add_event(session, job, f"Validation failed: {failure.message}", level="error")
        job_ended(session, job.id)


def _owned(session: Session, ctx: WorkerContext, claim: repo.Claim) -> FineTuningJob:
    """The job, locked, while this claim still holds it (else LostJob: cancelled meanwhile,
    or taken over after this worker lost its lease)."""
    repo.touch(session, claim, ctx.settings.lease_seconds)
    job = session.get(FineTuningJob, claim.job_id)
    assert job is not None
    return job


def _end(job: FineTuningJob, status: JobStatus) -> None:
    job.status = status
    job.worker_id = None
    job.lease_until = None
    if status in TERMINAL_STATUSES:
        job.finished_at = now_ts()


def validate_job(ctx: WorkerContext, job_id: str) -> None:
    """Validate the job's files, unless another worker holds the stage or it is over; an
    error ends as a failed job or a retry, never as an exception."""
    with transaction(ctx.session_factory) as session:
        claim = repo.claim_validation(
            session, job_id, ctx.settings.worker_id, ctx.settings.lease_seconds
        )
    if claim is None:
        return
    try:
        with LeaseKeeper(
            ctx.session_factory,
            claim,
            lease_seconds=ctx.settings.lease_seconds,
            interval=ctx.settings.heartbeat_seconds,
        ):
            _validate(ctx, claim)
    except repo.LostJob:
        log.info("validation of %s (attempt %s) superseded", job_id, claim.attempt)
    except Exception:
        log.exception("validation of %s (attempt %s) failed", job_id, claim.attempt)
        _interrupted(ctx, claim)


def _interrupted(ctx: WorkerContext, claim: repo.Claim) -> None:
    """Count a failed try: the reaper sends the next one after a short wait, or, at the
    limit, the job fails with a message that blames us, not the tenant's files."""
    try:
        with transaction(ctx.session_factory) as session:
            job = _owned(session, ctx, claim)
            job.failed_attempts += 1
            if job.failed_attempts >= job.max_attempts:
                message = INTERNAL_ERROR_MESSAGE.format(n=job.failed_attempts)
                _end(job, JobStatus.FAILED)
                job.error = {"code": "validation_error", "message": message, "param": None}
                add_event(session, job, f"Validation failed: {message}", level="error")
                job_ended(session, job.id)
                return
            job.worker_id = None
            # The reaper sends the next try once this wait is over.
            job.lease_until = now_ts() + ctx.settings.validation_retry_seconds
            add_event(
                session,
                job,
                "A temporary problem interrupted the validation of your files "
                f"({job.failed_attempts} of {job.max_attempts} allowed failures); it is tried "
                "again shortly.",
                level="warn",
            )
    except repo.LostJob:
        pass


def _validate(ctx: WorkerContext, claim: repo.Claim) -> None:
    snap = _snapshot(ctx, claim)
    method_type = snap.method["type"]
    params: dict[str, Any] = snap.method[method_type]["hyperparameters"]
    max_seq_len = params["max_seq_len"]
    if max_seq_len == "auto":
        max_seq_len = min(snap.context_length, AUTO_MAX_SEQ_LEN)
    recipe_method: Literal["sft", "dpo"] = "sft" if method_type == "supervised" else "dpo"
    try:
        model_path = local_model_path(ctx.settings, snap.base_name, snap.base_source)
        train_file = snap.files["training_file"]
        assert train_file is not None
        train = _tokenized(
            ctx,
            train_file,
            model_path,
            method=recipe_method,
            max_seq_len=max_seq_len,
            param="training_file",
        )
        valid_file = snap.files["validation_file"]
        valid = (
            _tokenized(
                ctx,
                valid_file,
                model_path,
                method=recipe_method,
                max_seq_len=max_seq_len,
                param="validation_file",
            )
            if valid_file
            else None
        )
    except ValidationFailed as failure:
        _fail(ctx, claim, failure)
        return
    except BaseModelUnavailable as exc:
        _fail(ctx, claim, ValidationFailed(str(exc), "model_unavailable", "model"))
        return

    resolved = resolve_auto(
        {**params, "max_seq_len": max_seq_len},
        n_examples=train.examples,
        mean_tokens=train.total_tokens / train.examples,
        method=recipe_method,
        context_length=snap.context_length,
    )
    multiplier = params.get("learning_rate_multiplier", "auto")
    # The job object shows the numbers used, as OpenAI's does once a job has started.
    hyper = {
        **params,
        **resolved,
        "learning_rate_multiplier": 1.0 if multiplier == "auto" else multiplier,
    }
    method = {"type": method_type, method_type: {"hyperparameters": hyper}}
    n_epochs = int(method[method_type]["hyperparameters"]["n_epochs"])

    with transaction(ctx.session_factory) as session:
        job = _owned(session, ctx, claim)
        job.method = method
        job.trained_tokens = train.trained_tokens * n_epochs
        job.artifacts = {
            "train": asdict(train),
            "valid": asdict(valid) if valid else None,
            "max_seq_len": max_seq_len,
        }
        _end(job, JobStatus.QUEUED)
        # Training starts afresh: its attempts count from 1 and get the whole failure budget.
        # Resetting the fencing token is safe here: a late validation write is fenced by the
        # status as well, and a job never returns to validating_files.
        job.attempt = 0
        job.failed_attempts = 0
        if train.truncated:
            shown = ", ".join(f"#{i + 1}" for i in train.truncated[:20])
            add_event(
                session,
                job,
                f"Truncated {len(train.truncated)} training example(s) longer than "
                f"max_seq_len={max_seq_len} tokens: {shown}.",
                level="warn",
            )
        add_event(
            session,
            job,
            f"Files validated: {train.examples} training examples, {train.total_tokens} tokens "
            f"({train.trained_tokens} trained per epoch); job queued.",
        )
        enqueue_wakeup(session, job.tenant_id, job.id)


def local_tokenized(ctx: WorkerContext, artifact: dict[str, Any]) -> Path:
    """The tokenized file on this worker's disk, downloaded from the cache if needed."""
    key = str(artifact["storage_key"])
    local = ctx.settings.data_dir / "cache" / "tokenized" / Path(key).name
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        ctx.storage.download_file(key, local)
    return local

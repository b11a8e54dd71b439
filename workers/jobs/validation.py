"""The validation stage: tokenize the job's files with the base model's tokenizer, count
tokens, apply max_seq_len, resolve "auto" hyperparameters, then queue the job.

Tokenized data is cached in object storage under a key made of (file sha256, tokenizer
fingerprint, max_seq_len, method, overflow policy): a retry, another worker, or a second job on
the same file reuses it instead of tokenizing again.
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

from common.datasets import DatasetError, iter_examples, parity_prompt
from common.datasets.validator import Example
from common.jobs import JobStatus
from common.storage import ObjectNotFound
from common.webhooks.events import emit_job_finished
from models_db.base import now_ts
from models_db.models import BaseModel, File, FineTuningJob
from models_db.session import transaction
from workers.context import WorkerContext
from workers.jobs.models import BaseModelUnavailable, local_model_path
from workers.jobs.repository import add_event, enqueue_wakeup
from workers.training.hparams import resolve_auto

log = logging.getLogger(__name__)

AUTO_MAX_SEQ_LEN = 2048


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


def _snapshot(ctx: WorkerContext, job_id: str) -> _JobSnapshot | None:
    with transaction(ctx.session_factory) as session:
        job = session.get(FineTuningJob, job_id)
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return None
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


def _fail(ctx: WorkerContext, job_id: str, failure: ValidationFailed) -> None:
    with transaction(ctx.session_factory) as session:
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return
        job.status = JobStatus.FAILED
        job.error = {"code": failure.code, "message": failure.message, "param": failure.param}
        job.finished_at = now_ts()
        add_event(session, job, f"Validation failed: {failure.message}", level="error")
        emit_job_finished(session, job.id)


def validate_job(ctx: WorkerContext, job_id: str) -> None:
    """Run the validation stage once; a second delivery of the same job does nothing."""
    snap = _snapshot(ctx, job_id)
    if snap is None:
        return
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
        _fail(ctx, job_id, failure)
        return
    except BaseModelUnavailable as exc:
        _fail(ctx, job_id, ValidationFailed(str(exc), "model_unavailable", "model"))
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
        job = session.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return  # cancelled meanwhile, or another delivery finished first
        job.method = method
        job.trained_tokens = train.trained_tokens * n_epochs
        job.artifacts = {
            "train": asdict(train),
            "valid": asdict(valid) if valid else None,
            "max_seq_len": max_seq_len,
        }
        job.status = JobStatus.QUEUED
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

"""Publishing the adapter of a finished training attempt (DESIGN §5, Finish).

The adapter is uploaded into a folder of this attempt's own (``models/JOB/aN``), the gateway
is asked to answer the held prompt as the trainer did (train/serve parity), then one
transaction marks the job succeeded and creates the model row, the usage record and the
webhook. A cancel acknowledged before that transaction wins: nothing is recorded and the
upload is deleted; so is the upload of an attempt that finds itself fenced out, fails the
parity check or fails to upload the whole folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common import ids
from common.jobs import JobStatus
from models_db.models import FineTunedModel, FineTuningJob, Tenant, UsageRecord
from models_db.session import transaction
from workers.context import WorkerContext
from workers.jobs import repository as repo
from workers.jobs.artifacts import upload_folder
from workers.jobs.cleanup import adapters_root
from workers.jobs.parity import ParityResult, check_parity

log = logging.getLogger(__name__)


class Publication:
    """The end of one successful attempt: ``done`` is the training child's last event."""

    def __init__(self, ctx: WorkerContext, claim: repo.Claim, done: dict[str, Any]) -> None:
        self.ctx = ctx
        self.claim = claim
        self.settings = ctx.settings
        self.done = done
        self.metrics: dict[str, Any] = done.get("metrics") or {}
        # One folder per attempt: an attempt taken over while uploading can never overwrite
        # what another attempt published.
        self.prefix = f"{adapters_root(claim.tenant_id, claim.job_id)}/a{claim.attempt}"

    def run(self) -> None:
        with transaction(self.ctx.session_factory) as session:
            repo.touch(session, self.claim, self.settings.lease_seconds)
            job = session.get(FineTuningJob, self.claim.job_id)
            tenant = session.get(Tenant, self.claim.tenant_id)
            assert job is not None and tenant is not None
            method_type = job.method["type"]
            params = job.method[method_type]["hyperparameters"]
            name = f"ft:{job.base_model_id}:{tenant.slug}:{job.suffix or ''}:{ids.short_id(8)}"
            base_model = job.base_model_id
        try:
            _manifest, digest = upload_folder(
                self.ctx.storage,
                Path(self.done["adapter_dir"]),
                self.prefix,
                {
                    "fine_tuned_model": name,
                    "job_id": self.claim.job_id,
                    "base_model": base_model,
                    "lora_rank": params["lora_rank"],
                    "method": method_type,
                    "training_config": params,
                    "metrics": self.metrics,
                },
            )
        except Exception:
            self._delete_upload()  # a part of a folder; the retry uploads into its own
            raise
        parity = self._check_parity(name, base_model, digest)
        try:
            if parity is not None and parity.ok is False:
                self._parity_failed(parity)
                published = False
            else:
                published = self._record(name, digest, parity, params)
        except repo.LostJob:
            self._delete_upload()  # this attempt's own folder: nothing points at it
            raise
        if not published:
            self._delete_upload()

    def _record(
        self, name: str, digest: str, parity: ParityResult | None, params: dict[str, Any]
    ) -> bool:
        """The publish transaction; False when a cancel came first (nothing recorded)."""
        job_id = self.claim.job_id
        with transaction(self.ctx.session_factory) as session:
            # The row lock this update takes holds off an API cancel until the commit, and a
            # cancel committed before it is seen here.
            if repo.touch(session, self.claim, self.settings.lease_seconds).cancel_requested:
                repo.finish(session, self.claim, JobStatus.CANCELLED)
                repo.add_event(session, self.claim, repo.CANCELLED_MESSAGE)
                return False
            job = session.get(FineTuningJob, job_id)
            assert job is not None
            if parity is not None:
                repo.add_event(session, self.claim, _parity_message(parity))
            repo.finish(session, self.claim, JobStatus.SUCCEEDED, fine_tuned_model=name)
            session.add_all(
                [
                    FineTunedModel(
                        id=name,
                        tenant_id=self.claim.tenant_id,
                        job_id=job_id,
                        base_model_id=job.base_model_id,
                        storage_prefix=self.prefix,
                        manifest_sha256=digest,
                        lora_rank=int(params["lora_rank"]),
                    ),
                    UsageRecord(
                        tenant_id=self.claim.tenant_id,
                        kind="trained_tokens",
                        quantity=int(job.trained_tokens or 0),
                        model=name,
                        job_id=job_id,
                    ),
                ]
            )
            loss = self.metrics.get("train_loss")
            repo.add_event(
                session,
                self.claim,
                f"New fine-tuned model created: {name}"
                + (f" (final training loss {loss:.4f})" if isinstance(loss, int | float) else ""),
                data={
                    "fine_tuned_model": name,
                    **{k: v for k, v in self.metrics.items() if v is not None},
                },
            )
            repo.add_event(session, self.claim, "The job has successfully completed.")
        return True

    def _delete_upload(self) -> None:
        try:
            self.ctx.storage.delete_prefix(f"{self.prefix}/")
        except Exception:  # left behind: nothing points at it
            log.warning("could not delete %s", self.prefix, exc_info=True)

    def _check_parity(self, name: str, base_model: str, digest: str) -> ParityResult | None:
        if not self.settings.gateway_url or not self.settings.parity_check:
            return None
        sample = self.done.get("parity")
        if not sample:
            return ParityResult(
                None,
                "",
                detail="the training run gave no reference answer (sharded FSDP runs "
                "and datasets whose first example uses tools do not)",
            )
        adapter = {
            "name": name,
            "base_model": base_model,
            "storage_prefix": self.prefix,
            "manifest_sha256": digest,
        }
        return check_parity(self.settings.gateway_url, self.settings.secret_key, adapter, sample)

    def _parity_failed(self, parity: ParityResult) -> None:
        served = "nothing" if parity.served_text is None else repr(parity.served_text[:200])
        message = (
            "Train/serve parity check failed: for the held sample prompt the trainer answered "
            f"{parity.trainer_text[:200]!r} but serving answered {served}"
            + (f" ({parity.detail})" if parity.detail else "")
            + ". The model was not published."
        )
        with transaction(self.ctx.session_factory) as session:
            status = repo.finish(
                session,
                self.claim,
                JobStatus.FAILED,
                error={"code": "parity_mismatch", "message": message, "param": None},
            )
            repo.add_event(session, self.claim, message, level="error")
            if status == JobStatus.CANCELLED:
                repo.add_event(session, self.claim, repo.CANCELLED_MESSAGE)


def _parity_message(parity: ParityResult) -> str:
    if parity.ok:
        return f"Train/serve parity check passed: serving answered {parity.trainer_text[:200]!r}."
    return f"Train/serve parity check skipped: {parity.detail}."

"""Settings of a worker process (training on the `train` queue, the rest on `default`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.settings import CommonSettings

# Name lookup (at most 5 s, common/webhooks/ssrf.py) plus recording the result.
_LEASE_MARGIN_SECONDS = 6.0


class WorkerSettings(CommonSettings):
    worker_id: str = Field(
        default="",
        description="Identifies this worker in job rows (default: hostname:pid).",
    )
    lease_seconds: int = Field(
        default=60,
        description="How long a claimed job stays ours without a heartbeat; after that the "
        "reaper re-queues it for another worker.",
    )
    heartbeat_seconds: float = Field(
        default=2.0, description="How often a running job's lease is extended and flags checked."
    )
    reaper_seconds: float = Field(
        default=10.0, description="How often this worker looks for jobs whose lease expired."
    )
    checkpoint_every_steps: int = Field(
        default=50, description="Optimizer steps between checkpoints (0: only at the end)."
    )
    checkpoint_keep: int = Field(
        default=3,
        ge=2,
        description="Checkpoints kept per job (the newest ones); older ones are deleted from "
        "the database and object storage as new ones are recorded. At least 2, so a resume "
        "whose latest checkpoint turns out corrupt has one to fall back to.",
    )
    on_overflow: Literal["truncate", "reject"] = Field(
        default="truncate",
        description="What happens to an example longer than max_seq_len: cut it (and say "
        "which) or fail the job naming the examples.",
    )
    train_nproc: int = Field(
        default=1, description="Processes per training job (>1 runs the recipe under torchrun)."
    )
    train_parallelism: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="With train_nproc > 1: 'ddp' (a whole model per process) or 'fsdp' "
        "(weights, gradients and optimizer state sharded across the processes).",
    )
    cancel_grace_seconds: float = Field(
        default=5.0, description="How long a cancelled training may take to stop before SIGKILL."
    )
    broker_visibility_timeout: int = Field(
        default=7 * 24 * 3600,
        description="Redis visibility timeout; longer than any job, so the lease (not the "
        "broker) decides when a job runs again.",
    )
    gateway_url: str = Field(
        default="",
        description="Base URL of the inference gateway, for the train/serve parity check "
        "run before a model is announced; empty: the check is skipped.",
    )
    parity_check: bool = Field(
        default=True,
        description="Run the train/serve parity check when a gateway URL is set.",
    )
    webhook_retry_schedule: str = Field(
        default="5,300,1800,7200,18000,36000,36000,36000,36000,36000,36000",
        description="Seconds to wait before each retry of a failed webhook delivery (±20% "
        "jitter); the default adds up to about three days.",
    )
    webhook_lease_seconds: float = Field(
        default=60.0,
        description="A delivery being sent is retried after this long if its worker died; "
        "at least WEBHOOK_TIMEOUT_SECONDS + 6.",
    )
    webhook_poll_seconds: float = Field(
        default=1.0, description="How often each worker looks for due webhook deliveries."
    )
    webhook_concurrency: int = Field(
        default=8, description="Webhook deliveries sent at once by one worker."
    )
    webhook_timeout_seconds: float = Field(
        default=15.0, description="Longest a webhook receiver may take to answer."
    )
    webhook_disable_after_seconds: int = Field(
        default=5 * 24 * 3600,
        description="An endpoint whose deliveries have all failed for this long is disabled.",
    )
    stall_timeout_seconds: float = Field(
        default=1800.0,
        ge=0,
        description="A training process that sends no event for this long is stopped and the "
        "attempt counts as failed (a deadlocked collective or a hung data loader would "
        "otherwise hold the job and the worker forever). It reports after every optimizer "
        "step and every ~30 s of an evaluation, so keep this well above the longest step and "
        "the time to load the base model (counted from the process's start); 0 disables it.",
    )
    validation_retry_seconds: int = Field(
        default=10,
        ge=1,
        description="After a temporary error in the validation stage, the reaper sends the "
        "next try once this wait is over.",
    )
    validation_resend_seconds: int = Field(
        default=300,
        ge=1,
        description="A job whose validation no worker has taken up for this long has its "
        "message sent again (a lost message).",
    )
    work_dir: Path | None = Field(
        default=None, description="Scratch space for jobs (default DATA_DIR/work)."
    )

    @model_validator(mode="after")
    def _fill_worker_defaults(self) -> WorkerSettings:
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        if self.webhook_lease_seconds < self.webhook_timeout_seconds + _LEASE_MARGIN_SECONDS:
            # A send still under way would be claimed and sent again elsewhere.
            raise ValueError(
                "LORAPLEX_WEBHOOK_LEASE_SECONDS must be at least LORAPLEX_WEBHOOK_TIMEOUT_SECONDS "
                f"+ {_LEASE_MARGIN_SECONDS:g} (the name lookup before a send may take 5 s, and "
                "the result must be recorded)."
            )
        return self

    @property
    def retry_schedule(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_schedule.split(",") if x.strip()]

    @property
    def scratch(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir

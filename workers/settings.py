"""Settings of a worker process (training on the `train` queue, the rest on `default`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.settings import CommonSettings


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
    on_overflow: Literal["truncate", "reject"] = Field(
        default="truncate",
        description="What happens to an example longer than max_seq_len: cut it (and say "
        "which) or fail the job naming the examples.",
    )
    train_nproc: int = Field(
        default=1, description="Processes per training job (>1 runs the recipe under torchrun)."
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
    work_dir: Path | None = Field(
        default=None, description="Scratch space for jobs (default DATA_DIR/work)."
    )

    @model_validator(mode="after")
    def _fill_worker_defaults(self) -> WorkerSettings:
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        return self

    @property
    def scratch(self) -> Path:
        assert self.work_dir is not None
        return self.work_dir

"""Job vocabulary shared by the API (which enqueues) and the workers (which run jobs).

Only names live here: the API sends tasks by name and never imports the worker code.
"""

from __future__ import annotations

from enum import StrEnum

TRAIN_QUEUE = "train"
DEFAULT_QUEUE = "default"
# Tokenize and check a new job's files, resolve "auto" hyperparameters, then queue it.
VALIDATE_JOB_TASK = "loraplex.fine_tuning.validate_job"
# Wake a training worker: it claims the next job by fair scheduling (not necessarily this one).
RUN_JOB_TASK = "loraplex.fine_tuning.run_job"
# Delete what an ended job's attempts left in object storage (common.job_endings).
SWEEP_JOB_TASK = "loraplex.fine_tuning.sweep_job"


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

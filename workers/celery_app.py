"""The Celery application of the workers (DESIGN §5): queues, reliability settings, tasks.

Long jobs: ``acks_late`` + ``prefetch_multiplier=1`` so a worker holds one message at a time
and a message is acknowledged only after its task ends; the Redis visibility timeout is longer
than any job, so the job's lease in Postgres (not the broker) decides when a job runs again.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from common.broker import make_publisher
from common.jobs import (
    DEFAULT_QUEUE,
    RUN_JOB_TASK,
    SWEEP_JOB_TASK,
    TRAIN_QUEUE,
    VALIDATE_JOB_TASK,
)
from common.outbox import Dispatcher
from common.storage import StorageError
from common.webhooks.events import DELIVER_WEBHOOK_TASK
from models_db.session import transaction
from workers.context import WorkerContext
from workers.file_expiry import expire_files
from workers.jobs.cleanup import sweep_scratch
from workers.jobs.reaper import reap
from workers.settings import WorkerSettings
from workers.webhooks.delivery import WebhookSender, set_local_sender, wake_local_sender

log = logging.getLogger(__name__)

# Built by create_worker_app() at process start; the task bodies read it.
_context: WorkerContext | None = None


def context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("worker context not initialised; start workers with create_worker_app")
    return _context


def create_worker_app(settings: WorkerSettings) -> Celery:
    global _context
    _context = WorkerContext.build(settings)
    # What training processes killed with this host or by SIGKILL left on its disk.
    sweep_scratch(settings.scratch)
    app = make_publisher(settings.broker_url)
    app.main = "loraplex-worker"
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        task_routes={RUN_JOB_TASK: {"queue": TRAIN_QUEUE}},
        # Redis only: kombu's SQLAlchemy transport (embedded mode) passes unknown options on
        # to create_engine(), which refuses them.
        broker_transport_options=(
            {"visibility_timeout": settings.broker_visibility_timeout}
            if settings.broker_url.startswith(("redis://", "rediss://"))
            else {}
        ),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        result_backend=None,
        task_ignore_result=True,
    )

    @app.task(name=VALIDATE_JOB_TASK)
    def validate_job(job_id: str) -> None:
        from workers.jobs.validation import validate_job as run

        run(context(), job_id)

    @app.task(name=RUN_JOB_TASK)
    def run_job(_job_id: str) -> None:
        # The message only wakes us: the job to run is chosen by fair scheduling.
        from workers.jobs.runner import run_available_jobs

        run_available_jobs(context())

    # A store that fails is tried again later (with acks_late the message stays until then).
    @app.task(
        name=SWEEP_JOB_TASK,
        autoretry_for=(StorageError,),
        retry_backoff=30,
        retry_backoff_max=3600,
        max_retries=8,
    )
    def sweep_job(job_id: str) -> None:
        # Sent when a job ends, wherever it ended (common.job_endings).
        from workers.jobs.cleanup import sweep_ended_job

        sweep_ended_job(context(), job_id)

    @app.task(name=DELIVER_WEBHOOK_TASK)
    def deliver_webhook(delivery_id: str) -> None:
        # A wake-up for one new delivery. The send itself happens on the sender's threads:
        # sending here would hold this worker's only task slot (the `default` queue's
        # validations and sweeps wait behind it) for as long as a slow receiver takes.
        del delivery_id  # the sender takes whatever is due, this one included
        wake_local_sender()

    return app


class Reaper:
    """Periodically re-queues jobs whose worker died (each worker runs one; runs are safe
    to overlap)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._ctx.settings.reaper_seconds):
            try:
                with transaction(self._ctx.session_factory) as session:
                    reap(
                        session,
                        validation_resend_seconds=self._ctx.settings.validation_resend_seconds,
                    )
            except Exception:
                log.exception("reaper pass failed")
            try:
                expire_files(self._ctx)
            except Exception:
                log.exception("expiring files failed")


def run_worker(settings: WorkerSettings, queues: list[str], *, loglevel: str = "INFO") -> None:
    """Start a worker in the foreground with its outbox dispatcher and reaper threads."""
    app = create_worker_app(settings)
    ctx = context()
    dispatcher = Dispatcher(ctx.session_factory, app, poll_seconds=0.5)
    reaper = Reaper(ctx)
    sender = WebhookSender(ctx.session_factory, settings)
    set_local_sender(sender)
    dispatcher.start()
    reaper.start()
    sender.start()
    try:
        app.worker_main(
            [
                "worker",
                "--queues",
                ",".join(queues),
                # One job at a time per worker process: training is the whole machine's work.
                "--pool",
                "solo",
                "--loglevel",
                loglevel,
                "--hostname",
                f"{settings.worker_id.replace(':', '-')}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        set_local_sender(None)
        sender.stop()
        reaper.stop()
        dispatcher.stop()

"""Claims, fencing, fair scheduling and the reaper, on a real Postgres database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common import ids
from common.jobs import RUN_JOB_TASK, JobStatus
from models_db.base import now_ts
from models_db.models import BaseModel, File, FineTuningJob, JobEvent, OutboxMessage, Tenant
from models_db.session import make_engine, make_session_factory, transaction
from workers.jobs import repository as repo
from workers.jobs.reaper import reap


@pytest.fixture
def factory(fresh_database) -> Iterator[sessionmaker[Session]]:  # type: ignore[no-untyped-def]
    engine = make_engine(fresh_database(migrate=True))
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        session.add(BaseModel(id="m", source="/nowhere", context_length=512, info={}))
    yield factory
    engine.dispose()


def _tenant(factory: sessionmaker[Session], slug: str, quota: int = 2) -> str:
    with transaction(factory) as session:
        tenant = Tenant(id=ids.new_id(ids.TENANT), name=slug, slug=slug, max_concurrent_jobs=quota)
        session.add(tenant)
        session.flush()
        session.add(
            File(
                id=f"file-{slug}",
                tenant_id=tenant.id,
                filename="f",
                purpose="fine-tune",
                bytes=1,
                sha256="0" * 64,
                storage_key="k",
                format="chat",
                examples=10,
            )
        )
    return tenant.id


def _queue_jobs(factory: sessionmaker[Session], tenant_id: str, slug: str, n: int) -> list[str]:
    created = []
    with transaction(factory) as session:
        for _ in range(n):
            job = FineTuningJob(
                id=ids.new_id(ids.JOB),
                tenant_id=tenant_id,
                base_model_id="m",
                training_file_id=f"file-{slug}",
                seed=1,
                status=JobStatus.QUEUED,
                method={"type": "supervised", "supervised": {"hyperparameters": {}}},
            )
            session.add(job)
            created.append(job.id)
    return created


def _claim(factory: sessionmaker[Session], worker: str = "w") -> repo.Claim | None:
    with transaction(factory) as session:
        return repo.claim_next(session, worker, lease_seconds=60)


def _finish(factory: sessionmaker[Session], claim: repo.Claim) -> None:
    with transaction(factory) as session:
        repo.finish(session, claim, JobStatus.SUCCEEDED)


def test_fair_scheduling_serves_the_other_tenant_before_a_third_job(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    b = _tenant(factory, "tenant-b")
    a_jobs = _queue_jobs(factory, a, "tenant-a", 10)
    (b_job,) = _queue_jobs(factory, b, "tenant-b", 1)
    # One worker, one job at a time: A, then B (A was served more recently), then A again.
    order = []
    for _ in range(3):
        claim = _claim(factory)
        assert claim is not None
        order.append(claim.job_id)
        _finish(factory, claim)
    assert order == [a_jobs[0], b_job, a_jobs[1]]


def test_fair_scheduling_with_two_workers(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    b = _tenant(factory, "tenant-b")
    a_jobs = _queue_jobs(factory, a, "tenant-a", 10)
    (b_job,) = _queue_jobs(factory, b, "tenant-b", 1)
    first, second = _claim(factory, "w1"), _claim(factory, "w2")
    assert first is not None and second is not None
    assert {first.job_id, second.job_id} == {a_jobs[0], b_job}


def test_tenant_quota_is_never_exceeded(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a", quota=2)
    _queue_jobs(factory, a, "tenant-a", 5)
    claims = [_claim(factory, f"w{i}") for i in range(4)]
    assert sum(c is not None for c in claims) == 2
    with transaction(factory) as session:
        running = session.scalars(
            select(FineTuningJob).where(FineTuningJob.status == JobStatus.RUNNING)
        ).all()
    assert len(running) == 2


def test_zombie_writes_are_refused(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    zombie = _claim(factory, "zombie")
    assert zombie is not None and zombie.attempt == 1
    # The zombie's lease runs out; the reaper re-queues; another worker claims attempt 2.
    with transaction(factory) as session:
        session.get(FineTuningJob, job_id).lease_until = now_ts() - 1  # type: ignore[union-attr]
    with transaction(factory) as session:
        assert reap(session, validation_resend_seconds=300) == 1
    winner = _claim(factory, "winner")
    assert winner is not None and winner.attempt == 2
    with pytest.raises(repo.LostJob), transaction(factory) as session:
        repo.touch(session, zombie, 60)
    with pytest.raises(repo.LostJob), transaction(factory) as session:
        repo.finish(session, zombie, JobStatus.SUCCEEDED)
    with transaction(factory) as session:
        flags = repo.touch(session, winner, 60)
        assert not flags.cancel_requested
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.worker_id == "winner" and job.status == JobStatus.RUNNING


def test_duplicate_wakeups_make_one_run(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    _queue_jobs(factory, a, "tenant-a", 1)
    assert _claim(factory, "w1") is not None
    assert _claim(factory, "w2") is None  # the second delivery finds nothing to claim


def test_reaper_fails_a_job_past_max_attempts(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    for attempt in range(1, 4):
        claim = _claim(factory, f"w{attempt}")
        assert claim is not None and claim.attempt == attempt
        with transaction(factory) as session:
            session.get(FineTuningJob, job_id).lease_until = now_ts() - 1  # type: ignore[union-attr]
        with transaction(factory) as session:
            reap(session, validation_resend_seconds=300)
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status == JobStatus.FAILED
        assert job.error is not None and job.error["code"] == "worker_lost"
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
        wakeups = session.scalars(
            select(OutboxMessage).where(
                OutboxMessage.args[0].as_string() == job_id, OutboxMessage.task == RUN_JOB_TASK
            )
        ).all()
    assert any("re-queued" in m for m in messages)
    assert len(wakeups) == 2  # after the first two losses, not after the last


def test_reaper_pauses_a_lost_job_whose_pause_was_requested(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    claim = _claim(factory, "w1")
    assert claim is not None
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        job.pause_requested_at = now_ts()  # the tenant paused, then the worker died
        job.lease_until = now_ts() - 1
    with transaction(factory) as session:
        assert reap(session, validation_resend_seconds=300) == 1
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status == JobStatus.PAUSED
        assert job.pause_requested_at is None and job.worker_id is None
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
        wakeups = session.scalars(
            select(OutboxMessage).where(
                OutboxMessage.args[0].as_string() == job_id, OutboxMessage.task == RUN_JOB_TASK
            )
        ).all()
    assert any("paused as requested" in m for m in messages)
    assert wakeups == []  # nothing runs it until the tenant resumes it
    assert _claim(factory, "w2") is None


def test_reaper_cancels_a_lost_job_whose_cancel_was_requested(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    for attempt in range(1, 4):  # the last attempt: a cancel wins over failing the job too
        claim = _claim(factory, f"w{attempt}")
        assert claim is not None
        if attempt < 3:
            with transaction(factory) as session:
                session.get(FineTuningJob, job_id).lease_until = now_ts() - 1  # type: ignore[union-attr]
            with transaction(factory) as session:
                reap(session, validation_resend_seconds=300)
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None
        job.cancel_requested_at = now_ts()  # acknowledged by the API, then the worker died
        job.lease_until = now_ts() - 1
    with transaction(factory) as session:
        assert reap(session, validation_resend_seconds=300) == 1
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status == JobStatus.CANCELLED
        assert job.finished_at is not None and job.error is None and job.worker_id is None
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert any("cancelled as requested" in m for m in messages)


@pytest.mark.parametrize(
    "ending",
    [
        (JobStatus.PAUSED, {}),
        (JobStatus.QUEUED, {}),
        (JobStatus.FAILED, {"error": {"code": "training_failed", "message": "x", "param": None}}),
    ],
)
def test_a_pending_cancel_wins_over_every_ending_but_success(factory, ending) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    claim = _claim(factory)
    assert claim is not None
    with transaction(factory) as session:
        session.get(FineTuningJob, job_id).cancel_requested_at = now_ts()  # type: ignore[union-attr]
    status, values = ending
    with transaction(factory) as session:
        assert repo.finish(session, claim, status, **values) == JobStatus.CANCELLED
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status == JobStatus.CANCELLED
        assert job.finished_at is not None and job.error is None and job.lease_until is None
    # Without a cancel the ending is the one asked for.
    (other,) = _queue_jobs(factory, a, "tenant-a", 1)
    claim = _claim(factory)
    assert claim is not None and claim.job_id == other
    with transaction(factory) as session:
        assert repo.finish(session, claim, status, **values) == status
    with transaction(factory) as session:
        job = session.get(FineTuningJob, other)
        assert job is not None and job.status == status and job.error == values.get("error")
        assert (job.finished_at is not None) == (status == JobStatus.FAILED)


def _pause_and_resume(factory: sessionmaker[Session], job_id: str, times: int) -> None:
    for _ in range(times):
        claim = _claim(factory)
        assert claim is not None and claim.job_id == job_id
        with transaction(factory) as session:
            repo.finish(session, claim, JobStatus.PAUSED)
        with transaction(factory) as session:  # what the API's resume does
            session.get(FineTuningJob, job_id).status = JobStatus.QUEUED  # type: ignore[union-attr]


def test_pause_and_resume_cycles_do_not_use_up_the_failure_budget(factory) -> None:  # type: ignore[no-untyped-def]
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    _pause_and_resume(factory, job_id, 3)
    claim = _claim(factory)
    assert claim is not None and claim.attempt == 4  # the fencing token still moves on
    with transaction(factory) as session:
        session.get(FineTuningJob, job_id).lease_until = now_ts() - 1  # type: ignore[union-attr]
    with transaction(factory) as session:
        assert reap(session, validation_resend_seconds=300) == 1
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status == JobStatus.QUEUED
        assert job.failed_attempts == 1
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)).all()
    assert any("(1 of 3 allowed failures); job re-queued" in m for m in messages), messages


def test_a_job_created_by_the_api_statement_starts_with_no_failures(factory) -> None:  # type: ignore[no-untyped-def]
    from api.fine_tuning.repository import JobRepository

    a = _tenant(factory, "tenant-a")
    job_id = ids.new_id(ids.JOB)
    values = {
        "now": now_ts(),
        "job_id": job_id,
        "base_model_id": "m",
        "training_file_id": "file-tenant-a",
        "validation_file_id": None,
        "suffix": None,
        "seed": 1,
        "job_metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
        "status": JobStatus.VALIDATING_FILES.value,
        "max_attempts": 3,
        "event_id": ids.new_id(ids.JOB_EVENT),
        "event_message": f"Created fine-tuning job: {job_id}",
        "outbox_task": "t",
        "outbox_queue": "q",
        "outbox_args": [job_id],
        "actor": "test",
        "audit_action": "job.create",
        "audit_data": {},
    }
    with transaction(factory) as session:
        JobRepository(session, a).insert_created(values, with_key=False)
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.failed_attempts == 0 and job.attempt == 0


@pytest.fixture(params=["postgres", "sqlite"])
def any_factory(request, fresh_database, tmp_path) -> Iterator[sessionmaker[Session]]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        import migrations

        url = f"sqlite:///{tmp_path / 'embedded.db'}"
        migrations.upgrade(url)
    else:
        url = fresh_database(migrate=True)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        session.add(BaseModel(id="m", source="/nowhere", context_length=512, info={}))
    yield factory
    engine.dispose()


def test_a_job_finished_while_the_reaper_decides_is_not_requeued(any_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The reaper reads the expired jobs, then writes: a worker finishing the job in between
    must wait for the reaper (and then find itself fenced out), not be overwritten by it. On
    SQLite this needs the write lock taken before the read (models_db.session)."""
    import threading
    import time

    from workers.jobs import reaper

    factory = any_factory
    a = _tenant(factory, "tenant-a")
    (job_id,) = _queue_jobs(factory, a, "tenant-a", 1)
    claim = _claim(factory, "slow-worker")
    assert claim is not None
    with transaction(factory) as session:
        session.get(FineTuningJob, job_id).lease_until = now_ts() - 1  # type: ignore[union-attr]

    finished: list[JobStatus] = []
    errors: list[BaseException] = []

    def worker_finishes() -> None:
        try:
            with transaction(factory) as session:
                finished.append(repo.finish(session, claim, JobStatus.SUCCEEDED))
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    finisher = threading.Thread(target=worker_finishes)
    read_expired = reaper.expired_jobs

    def expired_then_race(session: Session, now: int):  # type: ignore[no-untyped-def]
        rows = read_expired(session, now)
        finisher.start()
        time.sleep(0.5)  # time enough for an unblocked finish to commit
        return rows

    monkeypatch.setattr(reaper, "expired_jobs", expired_then_race)
    with transaction(factory) as session:
        assert reap(session, validation_resend_seconds=300) == 1
    finisher.join(timeout=30)
    assert not finisher.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], repo.LostJob), (errors, finished)
    with transaction(factory) as session:
        job = session.get(FineTuningJob, job_id)
        assert job is not None and job.status == JobStatus.QUEUED and job.worker_id is None

"""Outbox -> Redis: exactly one task message per job, even if the dispatcher dies mid-way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import redis
from sqlalchemy import select

from common.broker import make_publisher
from common.jobs import DEFAULT_QUEUE, RUN_JOB_TASK, TRAIN_QUEUE, VALIDATE_JOB_TASK
from common.outbox import dispatch_once
from models_db.models import OutboxMessage
from models_db.session import make_engine, make_session_factory, transaction
from tests.conftest import sibling_redis_url

# Runs the dispatcher in a child process that dies (os._exit) after publishing its batch, before
# the rows are marked: the worst moment (every row will be published a second time).
_KILLED_DISPATCHER = textwrap.dedent(
    """
    import os, sys
    from common import outbox as dispatcher
    from common.broker import make_publisher
    from models_db.session import make_engine, make_session_factory

    def die(*_a, **_k):
        os._exit(9)

    dispatcher.mark_published = die
    factory = make_session_factory(make_engine(sys.argv[1]))
    dispatcher.dispatch_once(factory, make_publisher(sys.argv[2]))
    """
)


def _messages(client: redis.Redis, queue: str) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]  # type: ignore[union-attr]


def test_one_message_per_job_even_when_dispatcher_killed(fresh_database, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    # Its own database and Redis database: no other dispatcher may touch these rows.
    migrated_db = fresh_database(migrate=True)
    url = sibling_redis_url(-1)
    client = redis.Redis.from_url(url)
    client.flushdb()
    engine = make_engine(migrated_db)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        rows = [
            OutboxMessage(task=RUN_JOB_TASK, queue=TRAIN_QUEUE, args=[f"ftjob-test{i}"])
            for i in range(3)
        ]
        session.add_all(rows)
    ids = [r.id for r in rows]

    child = subprocess.run(
        [sys.executable, "-c", _KILLED_DISPATCHER, migrated_db, url],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 9, child.stderr
    assert client.llen(TRAIN_QUEUE) == 3  # published, never marked

    while dispatch_once(factory, make_publisher(url)):
        pass
    with transaction(factory) as session:
        published = session.scalars(
            select(OutboxMessage.published_at).where(OutboxMessage.id.in_(ids))
        ).all()
    assert all(published)
    messages = _messages(client, TRAIN_QUEUE)
    job_ids = sorted(m["headers"]["argsrepr"] for m in messages)  # type: ignore[index]
    assert len(messages) == 3, job_ids
    assert len(set(job_ids)) == 3
    assert all(m["headers"]["task"] == RUN_JOB_TASK for m in messages)  # type: ignore[index]
    client.flushdb()
    engine.dispose()


def test_api_job_create_reaches_the_broker(api_server, make_tenant, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    """The create's outbox row is published to Redis right after commit (a worker may already
    have consumed the message, so the proof is the row's mark plus the broker's dedup claim)."""
    import time

    import httpx

    from tests import sample_data

    creds = make_tenant()
    client = redis.Redis.from_url(redis_url)
    auth = {"Authorization": f"Bearer {creds.api_key}"}
    with httpx.Client(base_url=api_server.base_url, headers=auth) as http:
        file_id = http.post(
            "/v1/files",
            files={"file": ("t.jsonl", sample_data.chat_jsonl())},
            data={"purpose": "fine-tune"},
        ).json()["id"]
        job_id = http.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id}
        ).json()["id"]
    with transaction(api_server.session_factory) as session:
        row = session.scalars(
            select(OutboxMessage).where(OutboxMessage.args[0].as_string() == job_id)
        ).one()
        row_id = row.id
    assert row.task == VALIDATE_JOB_TASK and row.queue == DEFAULT_QUEUE
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with transaction(api_server.session_factory) as session:
            published = session.get(OutboxMessage, row_id).published_at  # type: ignore[union-attr]
        if published and client.exists(f"loraplex:published:outbox-{row_id}"):
            return
        time.sleep(0.05)
    raise AssertionError("the outbox row was not published within 10 s")

"""Publishes outbox rows to the broker after their transaction committed (DESIGN §5).

Every process that writes outbox rows (the API, the workers) runs a :class:`Dispatcher`.

A row is published, then marked. A crash between the two publishes the row again on the next
pass; the broker layer makes that second publish a no-op on Redis (common.broker), and the
consumers' atomic claim makes a duplicate harmless everywhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import Row, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from common.broker import DEDUP_TASK_PREFIX
from models_db.base import now_ts
from models_db.models import OutboxMessage

log = logging.getLogger(__name__)


def task_id_for(row_id: int) -> str:
    return f"{DEDUP_TASK_PREFIX}{row_id}"


def _claim_batch(session: Session, batch_size: int) -> Sequence[Row[Any]]:
    # Plain rows, not ORM objects: at a hundred creates a second the identity map and the
    # per-row flushes were most of the dispatcher's CPU.
    stmt = (
        select(OutboxMessage.id, OutboxMessage.task, OutboxMessage.args, OutboxMessage.queue)
        .where(OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.id)
        .limit(batch_size)
    )
    if session.get_bind().dialect.name == "postgresql":
        # Several dispatchers (API replicas) never take the same rows.
        stmt = stmt.with_for_update(skip_locked=True)
    return session.execute(stmt).all()


def publish(publisher: Celery, row: Row[Any]) -> None:
    publisher.send_task(row.task, args=list(row.args), queue=row.queue, task_id=task_id_for(row.id))


def mark_published(session: Session, row_ids: list[int]) -> None:
    session.execute(
        update(OutboxMessage).where(OutboxMessage.id.in_(row_ids)).values(published_at=now_ts())
    )


def dispatch_once(factory: sessionmaker[Session], publisher: Celery, batch_size: int = 100) -> int:
    """Publish one batch of pending rows, then mark them; returns how many were published."""
    attempted: list[int] = []
    published: list[int] = []
    with factory() as session, session.begin():
        if session.get_bind().dialect.name == "postgresql":
            # Losing a "published" mark in a crash only re-publishes the row, which the broker
            # ignores (see module docstring): no need to wait for the WAL flush.
            session.execute(text("SET LOCAL synchronous_commit = off"))
        for row in _claim_batch(session, batch_size):
            attempted.append(row.id)
            try:
                publish(publisher, row)
            except Exception:
                log.exception("publishing outbox row %s failed; will retry", row.id)
                break
            published.append(row.id)
        if attempted:
            session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id.in_(attempted))
                .values(publish_attempts=OutboxMessage.publish_attempts + 1)
            )
        if published:
            mark_published(session, published)
    return len(published)


class Dispatcher:
    """A background thread that drains the outbox; ``wake()`` after a commit skips the wait."""

    def __init__(
        self, factory: sessionmaker[Session], publisher: Celery, poll_seconds: float = 1.0
    ) -> None:
        self._factory = factory
        self._publisher = publisher
        self._poll = poll_seconds
        self.batch_size = 100
        self.coalesce_seconds = 0.02
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # A short batch means the outbox is drained: no extra empty pass.
                while (
                    dispatch_once(self._factory, self._publisher, self.batch_size)
                    >= self.batch_size
                    and not self._stop.is_set()
                ):
                    pass
            except Exception:
                log.exception("outbox dispatcher pass failed")
            self._wake.wait(self._poll)
            self._wake.clear()
            # Commits that arrive together (a burst of creates) are published in one pass.
            self._stop.wait(self.coalesce_seconds)

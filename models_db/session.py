"""Engines and sessions. The caller owns the transaction boundary (one request, one task step)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the worker writes; busy_timeout turns lock contention into
    # waiting instead of "database is locked" errors.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_lock_for_update(
    conn: Any, cursor: Any, _statement: str, _parameters: Any, context: Any, _many: bool
) -> None:
    """Give ``SELECT … FOR UPDATE`` its meaning on SQLite: take the write lock before reading.

    SQLite has no row locks and its dialect drops FOR UPDATE, and pysqlite only begins a
    transaction at the first write. A read-then-write (the reaper re-queueing a job whose lease
    ran out, a cancel) would otherwise decide on rows that another connection may change before
    the write: the reaper could put back to `queued` a job that its worker had just finished.
    ``BEGIN IMMEDIATE`` makes every other writer wait (busy_timeout) until this transaction ends,
    and the rows read are then the latest.
    """
    compiled = getattr(context, "compiled", None)
    if compiled is None or getattr(compiled.statement, "_for_update_arg", None) is None:
        return
    if not conn.connection.dbapi_connection.in_transaction:
        cursor.execute("BEGIN IMMEDIATE")


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    lock_timeout_ms: int | None = None,
    pre_ping: bool = True,
    echo: bool = False,
) -> Engine:
    """Create an engine for ``url`` (SQLite file or Postgres) with sensible pool settings.

    ``lock_timeout_ms`` bounds how long a statement waits for a row lock (Postgres), so a
    contended row turns into an error instead of a pile-up of waiting requests.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "before_cursor_execute", _sqlite_lock_for_update)
        return engine
    connect_args: dict[str, Any] = {}
    if lock_timeout_ms is not None:
        connect_args["options"] = f"-c lock_timeout={int(lock_timeout_ms)}"
    return create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        # A ping costs a round trip per checkout; hot paths recycle connections instead.
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args=connect_args,
    )


_AUTOCOMMIT_ATTR = "_loraplex_autocommit"


def autocommit(engine: Engine) -> Engine:
    """``engine`` with each statement committed on its own, where that is safe to ask for.

    On Postgres this is the same pool in autocommit mode: a single statement, including one
    that writes several tables through data-modifying CTEs, is still atomic, and it saves the
    BEGIN and COMMIT round trips. Other databases (SQLite) get ``engine`` itself, so callers
    keep one transaction there and must commit.
    """
    if engine.dialect.name != "postgresql":
        return engine
    # Built once per engine (it costs ~80 us) and kept on the engine, so it lives as long.
    found: Engine | None = getattr(engine, _AUTOCOMMIT_ATTR, None)
    if found is None:
        found = engine.execution_options(isolation_level="AUTOCOMMIT")
        setattr(engine, _AUTOCOMMIT_ATTR, found)
    return found


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error, always close."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()

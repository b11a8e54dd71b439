"""Migrations: upgrade, downgrade, upgrade again on an empty Postgres; no model drift."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import migrations
from models_db.models import Base
from models_db.session import make_engine


def test_upgrade_downgrade_upgrade_and_no_drift(fresh_database) -> None:  # type: ignore[no-untyped-def]
    url = fresh_database()
    migrations.upgrade(url)
    migrations.downgrade(url, "base")
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrations.upgrade(url)
    migrations.upgrade(url)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"
    assert set(Base.metadata.tables) <= set(inspect(make_engine(url)).get_table_names())


def test_sqlite_runs_the_same_migrations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrations.upgrade(url)
    migrations.downgrade(url, "base")
    migrations.upgrade(url)
    engine = make_engine(url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()

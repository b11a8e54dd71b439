"""Declarative base, shared column types and naming conventions."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are derived, so migrations autogenerate the same names on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on Postgres (indexable, compact), plain JSON elsewhere.
JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY, Postgres wants BIGINT for event tables.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def now_ts() -> int:
    """Unix time in seconds; timestamps are stored as integers, as the OpenAI API shows them."""
    return int(time.time())


def now_ms() -> int:
    """Unix time in milliseconds, for due times that need finer steps than seconds."""
    return int(time.time() * 1000)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JsonType,
        list[Any]: JsonType,
        int: BigInteger,
    }


class Timestamped:
    created_at: Mapped[int] = mapped_column(default=now_ts)


class TenantOwned(Timestamped):
    """Marker for rows that belong to a tenant; every query for them filters on ``tenant_id``."""

    tenant_id: Mapped[str]

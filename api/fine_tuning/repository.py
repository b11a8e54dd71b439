"""Queries for fine-tuning jobs, their events and checkpoints, within the caller's tenant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BindParameter,
    Insert,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
)

from api.errors import BadRequest
from api.files.repository import live_file
from api.idempotency import STORED_COLUMNS, StoredResponse, key_insert, key_matches, stored_select
from api.pagination import check_cursor, page
from api.scoping import TenantScopedRepository
from common import ids
from common.ids import is_plausible_id, show_id
from models_db.base import now_ts
from models_db.models import (
    AuditLogEntry,
    BaseModel,
    File,
    FineTuningJob,
    IdempotencyKey,
    JobCheckpoint,
    JobEvent,
    OutboxMessage,
)

# --- job creation as Core statements ---------------------------------------------------------
# A create is the hot path of the API (DESIGN §11: 100 per second), so it skips the ORM: one
# SELECT gathers everything the checks need, and one statement writes the job, its first
# event, the outbox row, the audit row and the idempotency key (data-modifying CTEs on
# Postgres, where a single statement needs no explicit transaction).


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


_MODELS = _table(BaseModel)
_TRAIN = _table(File).alias("train")
_VALID = _table(File).alias("valid")
_KEYS = _table(IdempotencyKey)


def _live_file(alias: Any, param: str) -> Any:
    return and_(
        alias.c.id == bindparam(param),
        alias.c.tenant_id == bindparam("tenant_id"),
        live_file(alias.c, bindparam("now")),
    )


# One row whatever exists; a missing object comes back as NULLs.
_ONE_ROW = select(literal_column("1").label("one")).subquery("one_row")
_CREATE_LOOKUP = select(
    _MODELS.c.id.label("model_id"),
    _MODELS.c.enabled.label("model_enabled"),
    _MODELS.c.context_length.label("model_context_length"),
    _TRAIN.c.id.label("train_id"),
    _TRAIN.c.purpose.label("train_purpose"),
    _TRAIN.c.format.label("train_format"),
    _VALID.c.id.label("valid_id"),
    _VALID.c.purpose.label("valid_purpose"),
    _VALID.c.format.label("valid_format"),
    *STORED_COLUMNS,
).select_from(
    _ONE_ROW.outerjoin(_MODELS, _MODELS.c.id == bindparam("model"))
    .outerjoin(_TRAIN, _live_file(_TRAIN, "training_file"))
    .outerjoin(_VALID, _live_file(_VALID, "validation_file"))
    .outerjoin(_KEYS, key_matches())
)

_NOW: BindParameter[Any] = bindparam("now")
_JOB_ID: BindParameter[Any] = bindparam("job_id")
_TENANT: BindParameter[Any] = bindparam("tenant_id")
_CREATE_INSERTS: tuple[Insert, ...] = (
    insert(_table(FineTuningJob)).values(
        id=_JOB_ID,
        tenant_id=_TENANT,
        created_at=_NOW,
        base_model_id=bindparam("base_model_id"),
        training_file_id=bindparam("training_file_id"),
        validation_file_id=bindparam("validation_file_id"),
        suffix=bindparam("suffix"),
        seed=bindparam("seed"),
        metadata=bindparam("job_metadata"),
        method=bindparam("method"),
        status=bindparam("status"),
        attempt=0,
        max_attempts=bindparam("max_attempts"),
    ),
    insert(_table(JobEvent)).values(
        id=bindparam("event_id"),
        tenant_id=_TENANT,
        created_at=_NOW,
        job_id=_JOB_ID,
        level="info",
        type="message",
        message=bindparam("event_message"),
    ),
    insert(_table(OutboxMessage)).values(
        task=bindparam("outbox_task"),
        queue=bindparam("outbox_queue"),
        args=bindparam("outbox_args"),
        tenant_id=_TENANT,
        created_at=_NOW,
        publish_attempts=0,
    ),
    insert(_table(AuditLogEntry)).values(
        tenant_id=_TENANT,
        created_at=_NOW,
        actor=bindparam("actor"),
        action=bindparam("audit_action"),
        target_type="fine_tuning_job",
        target_id=_JOB_ID,
        data=bindparam("audit_data"),
    ),
)
_KEY_INSERT = key_insert()
_STORED = stored_select()


def _one_statement(inserts: Sequence[Insert]) -> Any:
    ctes = [stmt.cte(f"w{i}") for i, stmt in enumerate(inserts)]
    return select(literal_column("1")).add_cte(*ctes)


_CREATE_STATEMENT = _one_statement(_CREATE_INSERTS)
_CREATE_STATEMENT_WITH_KEY = _one_statement((_KEY_INSERT, *_CREATE_INSERTS))


@dataclass(frozen=True)
class BaseModelInfo:
    id: str
    enabled: bool
    context_length: int


@dataclass(frozen=True)
class FileInfo:
    id: str
    purpose: str
    format: str


@dataclass(frozen=True)
class CreateInputs:
    """What a job create checks, read in one query: each part is None when it doesn't exist."""

    base_model: BaseModelInfo | None
    training_file: FileInfo | None  # live and in the caller's tenant
    validation_file: FileInfo | None
    stored: StoredResponse | None  # the response already given for the Idempotency-Key


def _plausible(value: str | None) -> str | None:
    # Hostile ids never reach the driver; an implausible id names nothing.
    return value if value is not None and is_plausible_id(value) else None


class JobRepository(TenantScopedRepository[FineTuningJob]):
    model = FineTuningJob

    def list(
        self, *, after: str | None, limit: int, metadata: dict[str, str] | None
    ) -> tuple[Sequence[FineTuningJob], bool]:
        """A page of jobs; ``metadata`` filters on key/value pairs, or with None keeps the jobs
        that have no metadata (none given, null, or {})."""
        stmt = self.select()
        sqlite = self.session.get_bind().dialect.name == "sqlite"
        if metadata is None:
            column = FineTuningJob.job_metadata
            kind = func.json_type(column) if sqlite else func.jsonb_typeof(column)
            empty = (func.json(column) if sqlite else cast(column, Text)) == "{}"
            stmt = stmt.where(or_(column.is_(None), kind == "null", empty))
            metadata = {}
        for key, value in metadata.items():
            if sqlite:
                # SQLite's dialect splices the key into a JSON path ('$."key"') unescaped, so a
                # key holding a quote would break the query; json_each compares keys as values.
                entry = func.json_each(FineTuningJob.job_metadata).table_valued("key", "value")
                stmt = stmt.where(exists().where(entry.c.key == key, entry.c.value == value))
            else:
                stmt = stmt.where(FineTuningJob.job_metadata[key].as_string() == value)
        return page(self.session, stmt, FineTuningJob.id, after, limit, prefix=ids.JOB)

    def create_inputs(
        self,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        idempotency_key: str | None,
    ) -> CreateInputs:
        row = (
            self.session.connection()
            .execute(
                _CREATE_LOOKUP,
                {
                    "tenant_id": self.tenant_id,
                    "model": _plausible(model),
                    "training_file": _plausible(training_file),
                    "validation_file": _plausible(validation_file),
                    "idempotency_key": idempotency_key,
                    "now": now_ts(),  # an expired file is no file
                },
            )
            .one()
        )
        return CreateInputs(
            base_model=BaseModelInfo(row.model_id, row.model_enabled, row.model_context_length)
            if row.model_id is not None
            else None,
            training_file=FileInfo(row.train_id, row.train_purpose, row.train_format)
            if row.train_id is not None
            else None,
            validation_file=FileInfo(row.valid_id, row.valid_purpose, row.valid_format)
            if row.valid_id is not None
            else None,
            stored=StoredResponse(row.fingerprint, row.status_code, row.response)
            if row.fingerprint is not None
            else None,
        )

    def insert_created(self, values: dict[str, Any], *, with_key: bool) -> None:
        """Write a new job with its event, outbox and audit rows (and the idempotency key when
        ``with_key``) from ``values``, the statements' parameters. One statement on Postgres;
        elsewhere one per row, inside the caller's transaction. A key that another request
        holds raises IntegrityError (after waiting for that request's transaction)."""
        params = {**values, "tenant_id": self.tenant_id}
        conn = self.session.connection()
        if conn.dialect.name == "postgresql":
            conn.execute(_CREATE_STATEMENT_WITH_KEY if with_key else _CREATE_STATEMENT, params)
            return
        for stmt in (_KEY_INSERT, *_CREATE_INSERTS) if with_key else _CREATE_INSERTS:
            conn.execute(stmt, params)

    def stored_response(self, idempotency_key: str) -> StoredResponse | None:
        row = (
            self.session.connection()
            .execute(_STORED, {"tenant_id": self.tenant_id, "idempotency_key": idempotency_key})
            .first()
        )
        return StoredResponse(row.fingerprint, row.status_code, row.response) if row else None

    def get_for_update(self, job_id: str) -> FineTuningJob | None:
        # Row lock: cancel must not race the worker's claim (a no-op on SQLite, which
        # serializes writers anyway).
        if not is_plausible_id(job_id):
            return None  # a hostile id (NUL...) names nothing and never reaches the driver
        stmt = self.select().where(FineTuningJob.id == job_id).with_for_update()
        return self.session.scalars(stmt).first()


class JobEventRepository(TenantScopedRepository[JobEvent]):
    model = JobEvent

    def list(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[Sequence[JobEvent], bool]:
        stmt = self.select().where(JobEvent.job_id == job_id)
        check_cursor(after, ids.JOB_EVENT)
        if after:
            cursor = self.session.scalar(
                self.select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job_id)
            )
            if cursor is None:  # events are never deleted: this one was never this job's
                raise BadRequest(
                    f"Invalid 'after' cursor: {show_id(after)} is not an event of this job.",
                    param="after",
                )
            stmt = stmt.where(JobEvent.seq < cursor)
        rows = self.session.scalars(stmt.order_by(JobEvent.seq.desc()).limit(limit + 1)).all()
        return rows[:limit], len(rows) > limit


class CheckpointRepository(TenantScopedRepository[JobCheckpoint]):
    model = JobCheckpoint

    def list(
        self, job_id: str, *, after: str | None, limit: int
    ) -> tuple[Sequence[JobCheckpoint], bool]:
        stmt = self.select().where(JobCheckpoint.job_id == job_id)
        return page(self.session, stmt, JobCheckpoint.id, after, limit, prefix=ids.CHECKPOINT)

"""Long-lived objects of a worker process, built once when the worker starts."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.storage import ObjectStorage, storage_from_url
from models_db.session import make_engine, make_session_factory
from workers.settings import WorkerSettings


@dataclass
class WorkerContext:
    settings: WorkerSettings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: ObjectStorage

    @classmethod
    def build(cls, settings: WorkerSettings) -> WorkerContext:
        settings.ensure_data_dir()
        settings.scratch.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url, pool_size=4)
        return cls(
            settings=settings,
            engine=engine,
            session_factory=make_session_factory(engine),
            storage=storage_from_url(
                settings.storage_url,
                s3_endpoint_url=settings.s3_endpoint_url,
                base_dir=str(settings.data_dir),
            ),
        )

"""Long-lived objects of the API process, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.settings import APISettings
from common.storage import ObjectStorage


@dataclass
class Services:
    settings: APISettings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: ObjectStorage
    publisher: Celery

"""Long-lived objects of the API process, built once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.settings import APISettings
from api.tenancy.cache import TtlCache
from api.tenancy.service import Principal
from common.storage import ObjectStorage


@dataclass
class Services:
    settings: APISettings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: ObjectStorage
    publisher: Celery
    auth_cache: TtlCache[Principal]

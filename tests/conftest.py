"""Shared fixtures: a real Postgres database, Redis, SeaweedFS and a running API server.

Slow servers start once per test session. Tests isolate themselves by creating their own
tenants rather than by truncating tables, exactly as real tenants are isolated.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
import uvicorn

pytest_plugins = ["tests.fixtures.seaweedfs", "tests.fixtures.vllm"]

PG_ADMIN_URL = os.environ.get("LORAPLEX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LORAPLEX_TEST_REDIS", "redis://127.0.0.1:6379/13")
TEST_SECRET = "test-secret-key-" + "x" * 24


def sibling_redis_url(offset: int) -> str:
    """Another database of the test Redis at a fixed offset from REDIS_URL's, so that a side run
    with LORAPLEX_TEST_REDIS=…/9 shares (and flushes) nothing of a run on the default …/13."""
    base, _, db = REDIS_URL.rpartition("/")
    return f"{base}/{int(db) + offset}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sa_url(db_name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{db_name}"


def _create_database() -> str:
    name = f"loraplex_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """An empty Postgres database for this test session, dropped at the end."""
    name = _create_database()
    try:
        yield _sa_url(name)
    finally:
        _drop_database(name)


@pytest.fixture(scope="session")
def fresh_database_session() -> Iterator[str]:
    """A second migrated Postgres database for the whole session (the training stack's)."""
    import migrations

    name = _create_database()
    url = _sa_url(name)
    migrations.upgrade(url)
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture
def fresh_database():  # type: ignore[no-untyped-def]
    """Factory for extra empty (or migrated) Postgres databases, dropped after the test."""
    created: list[str] = []

    def factory(migrate: bool = False) -> str:
        name = _create_database()
        created.append(name)
        url = _sa_url(name)
        if migrate:
            import migrations

            migrations.upgrade(url)
        return url

    yield factory
    for name in created:
        _drop_database(name)


@pytest.fixture(scope="session")
def migrated_db(pg_database: str) -> str:
    import migrations

    migrations.upgrade(pg_database)
    return pg_database


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.training.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@dataclass
class RunningApi:
    base_url: str
    settings: object
    session_factory: object

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


def start_server(app: object, port: int) -> tuple[_ThreadedServer, threading.Thread]:
    server = _ThreadedServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("API server did not start")
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="session")
def api_settings(
    migrated_db: str, redis_url: str, seaweedfs_s3: object, tmp_path_factory: pytest.TempPathFactory
) -> object:
    import boto3

    from api.settings import APISettings

    endpoint = seaweedfs_s3.endpoint_url  # type: ignore[attr-defined]
    bucket = "loraplex-test"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    return APISettings(
        data_dir=tmp_path_factory.mktemp("data"),
        database_url=migrated_db,
        broker_url=redis_url,
        storage_url=f"s3://{bucket}/api",
        s3_endpoint_url=endpoint,
        secret_key=TEST_SECRET,
        min_examples=10,
        json_logs=True,
        log_level="WARNING",
    )


@pytest.fixture(scope="session")
def api_server(api_settings: object, tiny_model_dir: Path) -> Iterator[RunningApi]:
    """The API served by uvicorn on a free port, on Postgres + Redis + SeaweedFS."""
    from api.app import create_app
    from api.catalog.service import register_base_model
    from models_db.session import make_engine, make_session_factory, transaction

    engine = make_engine(api_settings.database_url)  # type: ignore[attr-defined]
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        register_base_model(session, "tiny-llama", str(tiny_model_dir))
    port = free_port()
    server, thread = start_server(create_app(api_settings), port)  # type: ignore[arg-type]
    try:
        yield RunningApi(f"http://127.0.0.1:{port}", api_settings, factory)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.dispose()


@dataclass
class TenantCreds:
    tenant_id: str
    slug: str
    api_key: str
    key_id: str


@pytest.fixture(scope="session")
def make_tenant(api_server: RunningApi):  # type: ignore[no-untyped-def]
    """Create a fresh tenant (with a full-scope key) in the running API's database."""
    from api.tenancy.service import create_api_key, create_tenant
    from models_db.session import transaction

    def factory(scopes: tuple[str, ...] = ("finetune", "inference", "admin")) -> TenantCreds:
        slug = "t-" + secrets.token_hex(6)
        with transaction(api_server.session_factory) as session:  # type: ignore[arg-type]
            tenant = create_tenant(session, f"Tenant {slug}", slug)
            created = create_api_key(session, TEST_SECRET, tenant, scopes=scopes)
        return TenantCreds(tenant.id, tenant.slug, created.secret, created.key.id)

    return factory

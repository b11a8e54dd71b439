"""A training stack of its own: API server, database, Redis database and bucket, plus a factory
for real `loraplex worker` processes.

The stack is separate from the control-plane tests' so those tests' never-trained jobs do not
become work for these workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
import redis

from tests.conftest import (
    TEST_SECRET,
    RunningApi,
    TenantCreds,
    free_port,
    sibling_redis_url,
    start_server,
)

WORKER_ENV = {
    "LORAPLEX_LEASE_SECONDS": "6",
    "LORAPLEX_HEARTBEAT_SECONDS": "0.5",
    "LORAPLEX_REAPER_SECONDS": "1",
    "LORAPLEX_CHECKPOINT_EVERY_STEPS": "5",
    "LORAPLEX_CANCEL_GRACE_SECONDS": "3",
    "LORAPLEX_LOG_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Webhooks: the test receivers listen on loopback; retries come fast.
    "LORAPLEX_WEBHOOK_ALLOW_HOSTS": "127.0.0.1,localhost",
    "LORAPLEX_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.4,0.4,0.8,0.8,1,1,1,1,1,1",
    "LORAPLEX_WEBHOOK_POLL_SECONDS": "0.2",
    "LORAPLEX_WEBHOOK_LEASE_SECONDS": "8",
    "LORAPLEX_WEBHOOK_TIMEOUT_SECONDS": "2",
}


@dataclass
class TrainingStack:
    api: RunningApi
    env: dict[str, str]
    bucket: str
    s3_prefix: str
    endpoint_url: str
    redis_url: str
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def s3(self):  # type: ignore[no-untyped-def]
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def keys(self, prefix: str) -> list[str]:
        listed = self.s3().list_objects_v2(Bucket=self.bucket, Prefix=f"{self.s3_prefix}/{prefix}")
        return [o["Key"] for o in listed.get("Contents", [])]

    def start_worker(self, name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker-{name}.log").open("ab")
        env = {**self.env, "LORAPLEX_WORKER_ID": name, **extra_env}
        env["LORAPLEX_DATA_DIR"] = str(self.tmp / f"worker-{name}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--queues", "train,default"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()

    def worker_log(self, name: str) -> str:
        path = self.tmp / f"worker-{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="session")
def training_stack(
    fresh_database_session,
    redis_url: str,
    seaweedfs_s3,
    tiny_model_dir: Path,  # type: ignore[no-untyped-def]
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TrainingStack]:
    from api.app import create_app
    from api.catalog.service import register_base_model
    from api.settings import APISettings
    from models_db.session import make_engine, make_session_factory, transaction

    database_url = fresh_database_session
    broker = sibling_redis_url(1)
    redis.Redis.from_url(broker).flushdb()
    bucket = "loraplex-training"
    s3 = boto3.client("s3", endpoint_url=seaweedfs_s3.endpoint_url, region_name="us-east-1")
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("training")
    env = {
        **os.environ,
        **WORKER_ENV,
        "LORAPLEX_DATABASE_URL": database_url,
        "LORAPLEX_BROKER_URL": broker,
        "LORAPLEX_STORAGE_URL": f"s3://{bucket}/stack",
        "LORAPLEX_S3_ENDPOINT_URL": seaweedfs_s3.endpoint_url,
        "LORAPLEX_SECRET_KEY": TEST_SECRET,
    }
    settings = APISettings(
        data_dir=tmp / "api",
        database_url=database_url,
        broker_url=broker,
        storage_url=f"s3://{bucket}/stack",
        s3_endpoint_url=seaweedfs_s3.endpoint_url,
        secret_key=TEST_SECRET,
        log_level="WARNING",
        dispatcher_poll_seconds=0.2,
        webhook_allow_hosts="127.0.0.1,localhost",
    )
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        register_base_model(session, "tiny-llama", str(tiny_model_dir))
    port = free_port()
    server, thread = start_server(create_app(settings), port)
    stack = TrainingStack(
        api=RunningApi(f"http://127.0.0.1:{port}", settings, factory),
        env=env,
        bucket=bucket,
        s3_prefix="stack",
        endpoint_url=seaweedfs_s3.endpoint_url,
        redis_url=broker,
        tmp=tmp,
    )
    try:
        yield stack
    finally:
        stack.stop_workers()
        server.should_exit = True
        thread.join(10)
        engine.dispose()


@pytest.fixture
def stack(training_stack: TrainingStack) -> Iterator[TrainingStack]:
    """The training stack, with every worker a test started stopped at its end."""
    yield training_stack
    training_stack.stop_workers()


@pytest.fixture
def tenant(training_stack: TrainingStack) -> TenantCreds:
    import secrets

    from api.tenancy.service import create_api_key, create_tenant
    from models_db.session import transaction

    slug = "w-" + secrets.token_hex(5)
    with transaction(training_stack.api.session_factory) as session:  # type: ignore[arg-type]
        row = create_tenant(session, f"Tenant {slug}", slug)
        row.max_concurrent_jobs = 4
        created = create_api_key(session, TEST_SECRET, row)
    return TenantCreds(row.id, row.slug, created.secret, created.key.id)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def job_status(stack: TrainingStack, key: str, job_id: str) -> dict[str, object]:
    response = httpx.get(
        f"{stack.api.base_url}/v1/fine_tuning/jobs/{job_id}",
        headers={"Authorization": f"Bearer {key}"},
    )
    response.raise_for_status()
    body: dict[str, object] = response.json()
    return body


def wait_status(
    stack: TrainingStack, key: str, job_id: str, statuses: set[str], timeout: float
) -> dict[str, object]:
    """Poll the job until its status is one of ``statuses``; returns the job object."""

    def check() -> dict[str, object] | None:
        job = job_status(stack, key, job_id)
        return job if job["status"] in statuses else None

    result: dict[str, object] = wait_for(
        check, timeout, f"job {job_id} to be {sorted(statuses)}", 0.2
    )
    return result

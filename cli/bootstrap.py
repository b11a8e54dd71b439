"""First-start setup for embedded mode: migrate, build and register the tiny model, a tenant."""

from __future__ import annotations

import fcntl
import socket
import subprocess
from pathlib import Path
from typing import IO

from api.settings import APISettings

TINY_MODEL_NAME = "tiny-llama"
DEMO_TENANT_SLUG = "demo"


def bootstrap_embedded(settings: APISettings) -> str | None:
    """Make a fresh embedded install usable; returns the demo tenant's new key, if created."""
    import migrations
    from api.catalog.repository import BaseModelRepository
    from api.catalog.service import register_base_model
    from api.tenancy.repository import TenantRepository
    from api.tenancy.service import create_api_key, create_tenant
    from models_db.session import make_engine, make_session_factory, transaction

    settings.ensure_data_dir()
    migrations.upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    secret = None
    try:
        with transaction(factory) as session:
            if BaseModelRepository(session).get(TINY_MODEL_NAME) is None:
                from workers.training.tiny_model import build_tiny_model

                folder = build_tiny_model(settings.data_dir / "models" / TINY_MODEL_NAME)
                register_base_model(session, TINY_MODEL_NAME, str(folder))
            if TenantRepository(session).get_by_slug_or_id(DEMO_TENANT_SLUG) is None:
                tenant = create_tenant(session, "Demo", DEMO_TENANT_SLUG)
                secret = create_api_key(session, settings.secret_key, tenant, name="demo").secret
    finally:
        engine.dispose()
    return secret


def start_embedded_vllm(settings: APISettings) -> tuple[subprocess.Popen[bytes], str] | None:
    """Start vLLM for the tiny model on a free port (output in DATA_DIR/vllm.log); None when
    no vLLM is installed. The gateway finds it healthy once it has loaded (30-60 s on a CPU)."""
    from serving.vllm_server import VLLMLaunch, default_vllm_python

    python = default_vllm_python()
    if not Path(python).exists():
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = VLLMLaunch(
        model_dir=str(settings.data_dir / "models" / TINY_MODEL_NAME),
        served_model_name=TINY_MODEL_NAME,
        host="127.0.0.1",
        port=port,
        max_model_len=None,  # the model's own context length
        max_lora_rank=settings.max_lora_rank,  # what the API lets jobs train
        python=python,
    )
    log = (settings.data_dir / "vllm.log").open("ab")
    process = subprocess.Popen(launch.command(), env=launch.env(), stdout=log, stderr=log)
    return process, launch.url


def hold_data_dir(data_dir: Path) -> IO[bytes] | None:
    """Lock ``data_dir`` for this `loraplex up` (released when the file is closed or the process
    ends, however it ends); None when another process holds it. Two stacks on one SQLite
    database and broker would take each other's jobs and messages."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / "up.lock").open("wb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be listened on now (checked before any process is started)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True

"""The ``loraplex`` command line (DESIGN §10). Heavy imports happen inside each command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from api.settings import APISettings


def _settings() -> APISettings:
    try:
        return APISettings()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


class _Main(click.Group):
    """The command group; a database that is missing or not migrated is a one-line error."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from sqlalchemy.exc import OperationalError, ProgrammingError

            if not isinstance(exc, OperationalError | ProgrammingError):
                raise
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            raise click.ClickException(
                f"database: {reason}. Is LORAPLEX_DATABASE_URL right, and has `loraplex "
                "migrate` (or `loraplex up`) been run?"
            ) from None


@click.group(cls=_Main)
def main() -> None:
    """loraplex: multi-tenant LoRA fine-tuning with an OpenAI-compatible API."""


@main.command()
def migrate() -> None:
    """Apply database migrations (idempotent)."""
    import migrations

    settings = _settings()
    settings.ensure_data_dir()
    migrations.upgrade(settings.database_url)
    click.echo("database is at the latest migration")


@main.command()
@click.option("--host", default=None, help="Address to listen on (default LORAPLEX_HOST).")
@click.option("--port", default=None, type=int, help="Port (default LORAPLEX_PORT or 8000).")
def api(host: str | None, port: int | None) -> None:
    """Run the control-plane API server."""
    import uvicorn

    from api.app import create_app

    settings = _settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_config=None,
        access_log=False,
    )


@main.command()
@click.option(
    "--queues",
    default="train,default",
    show_default=True,
    help="Comma-separated queues: train (fine-tuning) and/or default (validation, webhooks).",
)
def worker(queues: str) -> None:
    """Run a worker: one job at a time, with the outbox dispatcher and the lease reaper."""
    from workers.celery_app import run_worker
    from workers.settings import WorkerSettings

    try:
        settings = WorkerSettings()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    from common.logging import configure_logging

    configure_logging(settings.log_level, settings.json_logs)
    run_worker(settings, [q.strip() for q in queues.split(",") if q.strip()])


@main.command()
@click.option("--host", default=None, help="Address to listen on (default LORAPLEX_HOST).")
@click.option("--port", default=None, type=int, help="Port (default LORAPLEX_PORT or 8001).")
def gateway(host: str | None, port: int | None) -> None:
    """Run the inference gateway (chat/completions in front of the vLLM replicas)."""
    import uvicorn

    from serving.app import create_gateway_app
    from serving.settings import GatewaySettings

    try:
        settings = GatewaySettings()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    uvicorn.run(
        create_gateway_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
    )


@main.command()
@click.option("--port", default=8000, type=int, show_default=True)
def up(port: int) -> None:
    """Run loraplex on embedded defaults: API and gateway on one port, a worker, and a vLLM
    server for the tiny model (when `make vllm-venv` has been run), setting up what is missing
    first. Ctrl-C (or SIGTERM) stops everything; so does any of its processes exiting."""
    import os
    import signal
    import subprocess
    import threading

    import uvicorn

    from cli.bootstrap import bootstrap_embedded, hold_data_dir, port_is_free, start_embedded_vllm
    from serving.combined import create_combined_app
    from serving.settings import GatewaySettings

    # Plain, coloured log lines for a person at a terminal (this process and its children),
    # unless LORAPLEX_JSON_LOGS says otherwise.
    os.environ.setdefault("LORAPLEX_JSON_LOGS", "false")
    settings = _settings()
    lock = hold_data_dir(settings.data_dir)
    if lock is None:
        raise click.ClickException(
            f"another `loraplex up` is running on {settings.data_dir}; stop it first (or set "
            "LORAPLEX_DATA_DIR to another folder)"
        )
    if not port_is_free(port):
        raise click.ClickException(f"port {port} is in use; choose another with --port")
    key = bootstrap_embedded(settings)
    if key:
        click.echo(f"created tenant 'demo'; its API key (shown once): {key}")
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = threading.Event()
    died: list[str] = []

    def on_sigterm(signum: int, _frame: object) -> None:
        # uvicorn handles SIGTERM while it serves and then raises it again with this handler
        # back in place: the children are stopped below instead of left running.
        raise SystemExit(128 + signum)

    def watch_children(server: uvicorn.Server) -> None:
        # Half a stack (an API whose jobs no worker takes) is worse than none: stop it all.
        while not stopping.wait(1.0):
            for name, child in children:
                if child.poll() is not None and not server.should_exit:
                    died.append(f"{name} exited with code {child.returncode}")
                    server.should_exit = True  # uvicorn's own graceful shutdown
                    return

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        gateway_settings = GatewaySettings()
        if not gateway_settings.vllm_urls:
            started = start_embedded_vllm(settings)
            if started is None:
                click.echo(
                    "no vLLM found (run `make vllm-venv`): chat completions are off, "
                    "fine-tuning works",
                    err=True,
                )
            else:
                process, url = started
                children.append(("vLLM", process))
                gateway_settings = GatewaySettings(vllm_urls=url)
                click.echo(f"vLLM (tiny-llama) starting at {url}", err=True)
        worker_env = {**os.environ, "LORAPLEX_GATEWAY_URL": f"http://127.0.0.1:{port}"}
        worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=worker_env)
        children.append(("the worker", worker))
        app = create_combined_app(settings, gateway_settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
        watcher = threading.Thread(target=watch_children, args=(server,), daemon=True)
        watcher.start()
        click.echo(f"OpenAI base URL: http://127.0.0.1:{port}/v1")
        server.run()
    finally:
        # A second signal must not cut the cleanup short and leave children running.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopping.set()
        for _, child in children:
            child.terminate()
        for _, child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
        lock.close()
    if died:
        raise click.ClickException(f"{died[0]}; everything was stopped")


@main.command()
@click.option("--model", "model_name", required=True, help="A registered base model's name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8100, type=int, show_default=True, help="Port (not the gateway's 8001)."
)
@click.option("--max-loras", default=2, type=int, show_default=True, help="Adapters per batch.")
@click.option(
    "--max-cpu-loras", default=4, type=int, show_default=True, help="Adapters kept loaded."
)
@click.option(
    "--max-lora-rank",
    default=None,
    type=int,
    help="Largest adapter rank served (default: LORAPLEX_MAX_LORA_RANK, what jobs may train).",
)
@click.option(
    "--max-model-len",
    default=None,
    type=int,
    help="Context length (default: the registered model's).",
)
def vllm(
    model_name: str,
    host: str,
    port: int,
    max_loras: int,
    max_cpu_loras: int,
    max_lora_rank: int | None,
    max_model_len: int | None,
) -> None:
    """Start a vLLM server (LoRA enabled) for a registered base model; it replaces this process.

    vLLM runs from its own venv: `make vllm-venv`, or set LORAPLEX_VLLM_PYTHON.
    """
    import os

    from api.catalog.repository import BaseModelRepository
    from models_db.session import make_engine, make_session_factory, transaction
    from serving.vllm_server import VLLMLaunch, default_vllm_python

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            row = BaseModelRepository(session).get(model_name)
            if row is None:
                raise click.ClickException(
                    f"no base model {model_name!r}: register it with "
                    f"`loraplex models register {model_name} --source DIR`"
                )
            source, context_length = row.source, row.context_length
    finally:
        engine.dispose()
    folder = Path(source)
    if "://" in source or not folder.is_absolute() or not (folder / "config.json").is_file():
        raise click.ClickException(
            f"base model {model_name!r} has source {source!r}: `loraplex vllm` serves only "
            "models registered from a local folder (with a config.json) for now"
        )
    python = default_vllm_python()
    if not Path(python).exists():
        raise click.ClickException(
            f"no vLLM Python at {python}: run `make vllm-venv` or set LORAPLEX_VLLM_PYTHON"
        )
    launch = VLLMLaunch(
        model_dir=str(folder),
        served_model_name=model_name,
        host=host,
        port=port,
        max_lora_rank=max_lora_rank or settings.max_lora_rank,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_model_len=max_model_len or context_length,
        python=python,
    )
    argv = launch.command()
    click.echo(f"starting vLLM for {model_name} at {launch.url}/v1", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, launch.env())  # noqa: S606


@main.group()
def admin() -> None:
    """Platform administration: tenants, keys and dashboard users."""


@admin.command("create-tenant")
@click.argument("name")
@click.option("--slug", default=None, help="URL-safe short name (default: derived from NAME).")
def create_tenant(name: str, slug: str | None) -> None:
    """Create a tenant; its first API key is printed as the last line."""
    from api.tenancy.service import TenancyError, create_api_key
    from api.tenancy.service import create_tenant as create
    from models_db.session import make_engine, make_session_factory, transaction

    settings = _settings()
    factory = make_session_factory(make_engine(settings.database_url))
    try:
        with transaction(factory) as session:
            tenant = create(session, name, slug)
            created = create_api_key(session, settings.secret_key, tenant, name="first key")
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"tenant {tenant.id} (slug {tenant.slug})")
    click.echo(created.secret)


@admin.command("create-key")
@click.argument("tenant")
@click.option("--name", default="", help="A label for the key.")
@click.option(
    "--scopes",
    default="finetune,inference,admin",
    show_default=True,
    help="Comma-separated scopes: finetune, inference, admin.",
)
def create_key(tenant: str, name: str, scopes: str) -> None:
    """Create an API key for TENANT (id or slug); the key is printed once."""
    from api.tenancy.repository import TenantRepository
    from api.tenancy.service import TenancyError, create_api_key
    from models_db.session import make_engine, make_session_factory, transaction

    settings = _settings()
    factory = make_session_factory(make_engine(settings.database_url))
    try:
        with transaction(factory) as session:
            found = TenantRepository(session).get_by_slug_or_id(tenant)
            if found is None:
                raise click.ClickException(f"no tenant {tenant!r}")
            created = create_api_key(
                session,
                settings.secret_key,
                found,
                name=name,
                scopes=tuple(s.strip() for s in scopes.split(",") if s.strip()),
            )
    except TenancyError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(created.secret)


@admin.command("create-user")
@click.argument("email")
@click.option("--tenant", default=None, help="Tenant id or slug (not for platform admins).")
@click.option(
    "--role",
    type=click.Choice(["platform-admin", "tenant-admin", "member"]),
    required=True,
    help="platform-admin: every tenant; tenant-admin: one tenant; member: read-only.",
)
def create_user(email: str, tenant: str | None, role: str) -> None:
    """Create a dashboard (/admin) user; the password is read from stdin, or prompted for."""
    from api.admin.service import UserError
    from api.admin.service import create_user as create
    from api.tenancy.repository import TenantRepository
    from models_db.session import make_engine, make_session_factory, transaction

    # The flags are checked before a password is asked for.
    if role == "platform-admin" and tenant:
        raise click.ClickException("platform admins belong to no tenant: drop --tenant")
    if role != "platform-admin" and not tenant:
        raise click.ClickException(f"a {role} belongs to one tenant: add --tenant")
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    settings = _settings()
    factory = make_session_factory(make_engine(settings.database_url))
    try:
        with transaction(factory) as session:
            tenant_id = None
            if tenant:
                found = TenantRepository(session).get_by_slug_or_id(tenant)
                if found is None:
                    raise click.ClickException(f"no tenant {tenant!r}")
                tenant_id = found.id
            user = create(session, email, password, role, tenant_id)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"user {user.id} ({user.email}, {user.role})")


@admin.command("reset-password")
@click.argument("email")
def reset_password(email: str) -> None:
    """Set a dashboard user's password (read from stdin, or prompted for); every session of
    that user ends."""
    from api.admin import service
    from api.admin.repository import AdminRepository
    from models_db.session import make_engine, make_session_factory, transaction

    if sys.stdin.isatty():
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    settings = _settings()
    factory = make_session_factory(make_engine(settings.database_url))
    try:
        with transaction(factory) as session:
            user = AdminRepository(session, None).user_by_email(email.strip().lower())
            if user is None:
                raise click.ClickException(f"no user {email!r}")
            service.reset_password(session, service.CLI, user.id, password)
    except service.UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"password of {user.email} changed; their sessions ended")


@main.group()
def models() -> None:
    """Base models: build the tiny test model, register, list."""


@models.command("build-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "bench"]), default="tiny", show_default=True)
def build_tiny(directory: Path, preset: str) -> None:
    """Write the tiny Llama (random weights, local tokenizer) used by tests and the demo."""
    from workers.training.tiny_model import build_tiny_model

    out = build_tiny_model(directory, preset=preset)
    click.echo(f"wrote {preset} model to {out}")


@models.command("register")
@click.argument("name")
@click.option("--source", required=True, help="Local folder, hub id, or s3:// prefix.")
@click.option("--context-length", type=int, default=None, help="Override the context length.")
def register(name: str, source: str, context_length: int | None) -> None:
    """Register a base model that tenants can fine-tune."""
    from api.catalog.service import RegistrationError, register_base_model
    from models_db.session import make_engine, make_session_factory, transaction

    settings = _settings()
    factory = make_session_factory(make_engine(settings.database_url))
    try:
        with transaction(factory) as session:
            row = register_base_model(session, name, source, context_length=context_length)
            click.echo(f"registered {row.id} from {row.source} (context {row.context_length})")
    except RegistrationError as exc:
        raise click.ClickException(str(exc)) from exc
    first = Path(source.split("/", 1)[0])
    if row.source == source and "://" not in source and first.is_dir():
        # Taken as a hub id, yet it starts like a path here: most likely a mistyped folder,
        # which would only fail later, in the worker that tries to load it.
        click.echo(
            f"warning: there is no folder {source!r} here, so it was registered as a hub id "
            f"(the folder {str(first)!r} exists: is the path mistyped?)",
            err=True,
        )


@models.command("list")
def list_models() -> None:
    """List registered base models."""
    from api.catalog.repository import BaseModelRepository
    from models_db.session import make_engine, make_session_factory, transaction

    settings = _settings()
    factory = make_session_factory(make_engine(settings.database_url))
    with transaction(factory) as session:
        for row in BaseModelRepository(session).list(include_disabled=True):
            state = "" if row.enabled else " (disabled)"
            click.echo(f"{row.id}\t{row.source}\tcontext={row.context_length}{state}")


@main.group()
def files() -> None:
    """Dataset files."""


@files.command("validate")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["chat", "dpo", "alpaca", "sharegpt"]),
    default=None,
    help="Require this format (default: detect).",
)
def validate(path: Path, fmt: str | None) -> None:
    """Validate a dataset file offline with the same rules as the API."""
    from api.files.service import limits_from
    from common.datasets import DatasetError, DatasetFormat, validate_path

    try:
        summary = validate_path(path, limits_from(_settings()), DatasetFormat(fmt) if fmt else None)
    except DatasetError as err:
        click.echo(json.dumps({"valid": False, "code": err.code, "line": err.line}), err=False)
        click.echo(f"error: {err.message}", err=True)
        sys.exit(1)
    click.echo(
        json.dumps(
            {
                "valid": True,
                "format": summary.format.value,
                "examples": summary.examples,
                "bytes": summary.bytes,
            }
        )
    )


def _register_remote_commands() -> None:
    from cli.remote import jobs, register_upload

    main.add_command(jobs)
    register_upload(files)


_register_remote_commands()


if __name__ == "__main__":
    main()

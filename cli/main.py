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


@click.group()
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
@click.option("--port", default=8000, type=int, show_default=True)
def up(port: int) -> None:
    """Run loraplex on embedded defaults (API + worker), setting up what is missing first."""
    import subprocess

    import uvicorn

    from api.app import create_app
    from cli.bootstrap import bootstrap_embedded

    settings = _settings()
    key = bootstrap_embedded(settings)
    if key:
        click.echo(f"created tenant 'demo'; its API key (shown once): {key}")
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker"])
    click.echo(f"OpenAI base URL: http://127.0.0.1:{port}/v1")
    try:
        uvicorn.run(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()


@main.group()
def admin() -> None:
    """Platform administration: tenants and keys."""


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


if __name__ == "__main__":
    main()

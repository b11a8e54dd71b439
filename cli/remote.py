"""CLI commands that use the public API of a running loraplex (like the openai SDK would):
``loraplex jobs list|create|retrieve|cancel|watch`` and ``loraplex files upload``.

The server and key come from ``--base-url``/``--api-key`` or ``LORAPLEX_BASE_URL`` /
``LORAPLEX_API_KEY`` (``OPENAI_API_KEY`` also works).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


@contextmanager
def _client(ctx: click.Context) -> Iterator[httpx.Client]:
    """A client for the server; a server that cannot be reached is a one-line error."""
    base_url, api_key = ctx.obj["base_url"], ctx.obj["api_key"]
    if not api_key:
        raise click.ClickException(
            "no API key: pass --api-key or set LORAPLEX_API_KEY (the key `loraplex up` printed)"
        )
    try:
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        ) as http:
            yield http
    except (httpx.TransportError, httpx.InvalidURL) as exc:
        raise click.ClickException(
            f"cannot reach {base_url}: {exc or type(exc).__name__} (is the server running, and "
            "is --base-url / LORAPLEX_BASE_URL its http(s)://…/v1 address?)"
        ) from None


def checked_json(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON; an error answer becomes a one-line error naming its field."""
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        raise click.ClickException(f"{response.status_code}: {response.text[:300]}") from None
    if response.status_code >= 400:
        error = body.get("error") or {}
        where = f" ({error['param']})" if error.get("param") else ""
        raise click.ClickException(f"{response.status_code}: {error.get('message')}{where}")
    return body


def _show(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def connection_options(group: click.Group) -> click.Group:
    group = click.option(
        "--api-key",
        envvar=["LORAPLEX_API_KEY", "OPENAI_API_KEY"],
        default=None,
        help="API key (env LORAPLEX_API_KEY).",
    )(group)
    group = click.option(
        "--base-url",
        envvar="LORAPLEX_BASE_URL",
        default=DEFAULT_BASE_URL,
        show_default=True,
        help="The server's OpenAI base URL (env LORAPLEX_BASE_URL).",
    )(group)
    return group


@click.group()
@click.pass_context
def jobs(ctx: click.Context, base_url: str, api_key: str | None) -> None:
    """Fine-tuning jobs on a running server."""
    ctx.obj = {"base_url": base_url.rstrip("/"), "api_key": api_key}


jobs = connection_options(jobs)


@jobs.command("list")
@click.option("--limit", default=20, show_default=True)
@click.pass_context
def list_jobs(ctx: click.Context, limit: int) -> None:
    """List your jobs, newest first."""
    with _client(ctx) as http:
        body = checked_json(http.get("/fine_tuning/jobs", params={"limit": limit}))
    for job in body["data"]:
        model = job.get("fine_tuned_model") or ""
        click.echo(f"{job['id']}  {job['status']:<16} {job['model']:<24} {model}")


@jobs.command("create")
@click.option("--model", required=True, help="Base model, e.g. tiny-llama.")
@click.option("--training-file", required=True, help="A file id from `loraplex files upload`.")
@click.option("--validation-file", default=None)
@click.option("--suffix", default=None)
@click.option("--method", type=click.Choice(["supervised", "dpo"]), default="supervised")
@click.option("--n-epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--learning-rate-multiplier", type=float, default=None)
@click.option("--lora-rank", type=int, default=None)
@click.option("--watch/--no-watch", default=False, help="Show progress until the job ends.")
@click.pass_context
def create_job(
    ctx: click.Context,
    /,
    model: str,
    training_file: str,
    validation_file: str | None,
    suffix: str | None,
    method: str,
    watch: bool,
    **hyper: Any,
) -> None:
    """Start a fine-tuning job."""
    chosen = {k: v for k, v in hyper.items() if v is not None}
    body: dict[str, Any] = {"model": model, "training_file": training_file}
    if validation_file:
        body["validation_file"] = validation_file
    if suffix:
        body["suffix"] = suffix
    body["method"] = {"type": method, method: {"hyperparameters": chosen}}
    with _client(ctx) as http:
        job = checked_json(http.post("/fine_tuning/jobs", json=body))
        click.echo(job["id"])
        if watch:
            from cli.watch import watch_job

            final = watch_job(http, job["id"])
            _ended(final)


@jobs.command("retrieve")
@click.argument("job_id")
@click.pass_context
def retrieve_job(ctx: click.Context, job_id: str) -> None:
    """Show one job as JSON."""
    with _client(ctx) as http:
        _show(checked_json(http.get(f"/fine_tuning/jobs/{job_id}")))


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_context
def cancel_job(ctx: click.Context, job_id: str) -> None:
    """Cancel a job."""
    with _client(ctx) as http:
        job = checked_json(http.post(f"/fine_tuning/jobs/{job_id}/cancel"))
    click.echo(f"{job['id']}  {job['status']}")


@jobs.command("watch")
@click.argument("job_id")
@click.pass_context
def watch(ctx: click.Context, job_id: str) -> None:
    """A progress bar (step, loss, ETA) until the job ends."""
    from cli.watch import watch_job

    with _client(ctx) as http:
        final = watch_job(http, job_id)
    _ended(final)


def _ended(final: dict[str, Any]) -> None:
    """Print how a watched job ended; exit 1 unless it succeeded."""
    error = final.get("error") or {}
    detail = final.get("fine_tuned_model") or (error.get("message") if error else "") or ""
    click.echo(f"{final['status']}: {detail}")
    if final["status"] != "succeeded":
        raise SystemExit(1)


def register_upload(files: click.Group) -> None:
    @files.command("upload")
    @click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--purpose", default="fine-tune", show_default=True)
    @click.option("--base-url", envvar="LORAPLEX_BASE_URL", default=DEFAULT_BASE_URL)
    @click.option("--api-key", envvar=["LORAPLEX_API_KEY", "OPENAI_API_KEY"], default=None)
    def upload(path: Path, purpose: str, base_url: str, api_key: str | None) -> None:
        """Upload a dataset file to a running server; prints its id."""
        ctx = click.Context(upload, obj={"base_url": base_url.rstrip("/"), "api_key": api_key})
        with _client(ctx) as http, path.open("rb") as handle:
            body = checked_json(
                http.post(
                    "/files",
                    files={"file": (path.name, handle)},
                    data={"purpose": purpose},
                    timeout=600,
                )
            )
        click.echo(body["id"])

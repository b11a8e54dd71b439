"""`loraplex jobs …` / `loraplex files upload` against a running API: ordinary mistakes get a
one-line error and exit 1 (never a traceback), and a watched job that does not succeed exits 1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from cli.main import main
from tests import sample_data
from tests.conftest import RunningApi, TenantCreds, free_port


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def _failed_cleanly(result: Result, *expected: str) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    # A ClickException (or the watch's exit 1), not a traceback of an unexpected error.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    for text in expected:
        assert text in result.output, result.output


@pytest.mark.parametrize(
    "base_url", [f"http://127.0.0.1:{free_port()}/v1", "notaurl"], ids=["nothing", "bad"]
)
def test_a_server_that_cannot_be_reached_is_a_one_line_error(base_url: str, tmp_path: Path) -> None:
    _failed_cleanly(_run("jobs", "--api-key", "k", "--base-url", base_url, "list"), "cannot reach")
    dataset = tmp_path / "d.jsonl"
    dataset.write_bytes(sample_data.chat_jsonl())
    _failed_cleanly(
        _run("files", "upload", str(dataset), "--api-key", "k", "--base-url", base_url),
        "cannot reach",
    )


def test_watch_with_a_wrong_key_or_an_unknown_job_is_a_one_line_error(
    api_server: RunningApi, make_tenant: Callable[..., TenantCreds]
) -> None:
    base = api_server.openai_base_url
    _failed_cleanly(
        _run("jobs", "--api-key", "wrong", "--base-url", base, "watch", "ftjob-x"), "401"
    )
    key = make_tenant().api_key
    _failed_cleanly(_run("jobs", "--api-key", key, "--base-url", base, "watch", "ftjob-x"), "404")


def test_create_and_watch_exits_1_when_the_job_is_cancelled(
    api_server: RunningApi, make_tenant: Callable[..., TenantCreds], tmp_path: Path
) -> None:
    key = make_tenant().api_key
    base = api_server.openai_base_url
    dataset = tmp_path / "d.jsonl"
    dataset.write_bytes(sample_data.chat_jsonl())
    uploaded = _run("files", "upload", str(dataset), "--api-key", key, "--base-url", base)
    assert uploaded.exit_code == 0, uploaded.output
    file_id = uploaded.output.strip().splitlines()[-1]

    def cancel_it() -> None:
        # No worker runs here: the job waits until this cancels it.
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                listed = http.get("/fine_tuning/jobs").json()["data"]
                if listed:
                    http.post(f"/fine_tuning/jobs/{listed[0]['id']}/cancel")
                    return
                time.sleep(0.2)

    canceller = threading.Thread(target=cancel_it)
    canceller.start()
    result = _run(
        "jobs",
        "--api-key",
        key,
        "--base-url",
        base,
        "create",
        "--model",
        "tiny-llama",
        "--training-file",
        file_id,
        "--watch",
    )
    canceller.join(60)
    _failed_cleanly(result, "cancelled")

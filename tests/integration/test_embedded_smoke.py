"""Embedded mode end to end through the CLI: SQLite, the SQLite-backed broker, a local folder."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from tests import sample_data
from tests.conftest import free_port

LORAPLEX = [sys.executable, "-m", "cli.main"]


def _run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        LORAPLEX + args, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_embedded_mode_smoke(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LORAPLEX_DATA_DIR": str(tmp_path / "state"),
        "LORAPLEX_LOG_LEVEL": "WARNING",
    }
    for key in ("LORAPLEX_DATABASE_URL", "LORAPLEX_BROKER_URL", "LORAPLEX_STORAGE_URL"):
        env.pop(key, None)
    _run(["migrate"], env)
    _run(["migrate"], env)  # idempotent
    _run(["models", "build-tiny", str(tmp_path / "tiny")], env)
    assert "tiny-llama" in _run(
        ["models", "register", "tiny-llama", "--source", str(tmp_path / "tiny")], env
    )
    assert "tiny-llama" in _run(["models", "list"], env)
    key = _run(["admin", "create-tenant", "Smoke Test"], env).strip().splitlines()[-1]
    assert key.startswith("lpx_")
    second = _run(["admin", "create-key", "smoke-test", "--scopes", "inference"], env).strip()
    assert second.startswith("lpx_") and second != key

    port = free_port()
    server = subprocess.Popen([*LORAPLEX, "api", "--port", str(port)], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "embedded API did not become ready"
            time.sleep(0.2)
        client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        f = client.files.create(
            file=("t.jsonl", io.BytesIO(sample_data.chat_jsonl())), purpose="fine-tune"
        )
        metadata = {'say "hi"\\': "quote", "team": "search"}
        job = client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=f.id, metadata=metadata
        )
        assert client.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
        # The metadata filter on SQLite, with keys that are not plain identifiers.
        for key, value in metadata.items():
            listed = client.fine_tuning.jobs.list(metadata={key: value}).data
            assert [j.id for j in listed] == [job.id], key
            assert client.fine_tuning.jobs.list(metadata={key: "other"}).data == []
        plain = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
        without = client.fine_tuning.jobs.list(extra_query={"metadata": "null"}).data
        assert [j.id for j in without] == [plain.id]  # on SQLite too
        assert (tmp_path / "state" / "objects" / "tenants").is_dir()

        # The outbox row reached the embedded (SQLite) broker as a task message.
        deadline = time.monotonic() + 15
        while True:
            try:
                with sqlite3.connect(tmp_path / "state" / "broker.db") as db:
                    payloads = [row[0] for row in db.execute("SELECT payload FROM kombu_message")]
            except sqlite3.OperationalError:  # the broker creates its tables on first publish
                payloads = []
            if any(job.id in str(p) for p in payloads):
                break
            assert time.monotonic() < deadline, "job message never reached the embedded broker"
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(20)


def test_files_validate_command(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(sample_data.chat_jsonl())
    env = {**os.environ, "LORAPLEX_DATA_DIR": str(tmp_path / "state")}
    out = _run(["files", "validate", str(good)], env)
    assert '"format": "chat"' in out and '"examples": 12' in out
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(sample_data.chat_jsonl().replace(b'"assistant"', b'"robot"', 1))
    result = subprocess.run(
        [*LORAPLEX, "files", "validate", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "line 1" in result.stderr and "robot" in result.stderr


def test_ordinary_mistakes_are_one_line_errors_before_anything_is_asked(tmp_path: Path) -> None:
    env = {**os.environ, "LORAPLEX_DATA_DIR": str(tmp_path / "state")}
    for key in ("LORAPLEX_DATABASE_URL", "LORAPLEX_BROKER_URL", "LORAPLEX_STORAGE_URL"):
        env.pop(key, None)

    def fails(args: list[str], stdin: str = "") -> str:
        result = subprocess.run(
            [*LORAPLEX, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        return result.stderr

    assert "loraplex migrate" in fails(["models", "list"])  # before any migration
    _run(["migrate"], env)
    assert "give one" in fails(["admin", "create-tenant", "!!!"])
    # The flags are refused before a password is read.
    assert "add --tenant" in fails(["admin", "create-user", "a@b.co", "--role", "member"], "pw")
    # A mistyped folder is registered as a hub id, with a warning that says so.
    (tmp_path / "models").mkdir()
    typo = subprocess.run(
        [*LORAPLEX, "models", "register", "typo", "--source", "models/tiny-lama"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert typo.returncode == 0, typo.stderr
    assert "is the path mistyped?" in typo.stderr

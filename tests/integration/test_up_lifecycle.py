"""`loraplex up` as a process tree: SIGTERM (systemd, docker stop, kill) stops its children too,
one of its processes dying stops the rest, and a second `up` on the same folder is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

LORAPLEX = [sys.executable, "-m", "cli.main"]


def _env(data_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "LORAPLEX_DATA_DIR": str(data_dir),
        "LORAPLEX_LOG_LEVEL": "WARNING",
        # A replica that is never there: `up` then starts no vLLM (slow), the rest runs.
        "LORAPLEX_VLLM_URLS": "http://127.0.0.1:9",
    }
    for key in ("LORAPLEX_DATABASE_URL", "LORAPLEX_BROKER_URL", "LORAPLEX_STORAGE_URL"):
        env.pop(key, None)
    return env


def _children(pid: int) -> list[int]:
    found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(p) for p in found]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    data_dir = tmp_path / "state"
    port = free_port()
    up = subprocess.Popen(
        [*LORAPLEX, "up", "--port", str(port)],
        env=_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:
        assert up.poll() is None, up.communicate()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "`loraplex up` did not answer /healthz"
        time.sleep(0.5)
    try:
        yield up, data_dir
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)


def test_sigterm_stops_the_children_and_a_second_up_is_refused(
    running_up: tuple[subprocess.Popen[str], Path],
) -> None:
    up, data_dir = running_up
    second = subprocess.run(
        [*LORAPLEX, "up", "--port", str(free_port())],
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode != 0
    assert "another `loraplex up` is running" in second.stderr
    children = _children(up.pid)
    assert children, "no worker started"
    up.send_signal(signal.SIGTERM)
    assert up.wait(60) != 0
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if _alive(c)], "children left running after SIGTERM"


def test_a_worker_that_dies_stops_the_whole_stack(
    running_up: tuple[subprocess.Popen[str], Path],
) -> None:
    up, _ = running_up
    [worker] = _children(up.pid)
    os.kill(worker, signal.SIGKILL)
    assert up.wait(60) != 0
    _, stderr = up.communicate()
    assert "the worker exited with code -9; everything was stopped" in stderr

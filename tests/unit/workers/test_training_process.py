"""The training subprocess wrapper: events, and a child that will not exit."""

from __future__ import annotations

import sys
from pathlib import Path

from workers.jobs.subprocess_io import TrainingProcess


def _child(tmp_path: Path, code: str) -> TrainingProcess:
    return TrainingProcess([sys.executable, "-c", code], log_path=tmp_path / "child.log", env={})


def test_events_then_the_exit_code(tmp_path: Path) -> None:
    proc = _child(tmp_path, 'print(\'{"type": "started"}\'); print("noise"); raise SystemExit(3)')
    assert proc.events.get(timeout=30) == {"type": "started"}
    assert proc.events.get(timeout=30) is None  # the end of its output
    assert proc.wait() == 3


def test_a_child_that_closes_its_output_but_never_exits_is_stopped(tmp_path: Path) -> None:
    hang = "import os, time; os.close(1); time.sleep(600)"
    proc = _child(tmp_path, hang)
    assert proc.events.get(timeout=30) is None
    assert proc.wait(exit_grace=0.5) != 0  # stopped, not waited on for ten minutes

"""Running the recipe as the worker does: ``python -m workers.training.run SPEC.json``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.training.launcher import launch_command
from workers.training.spec import TrainingSpec


@dataclass
class Finished:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]


def run_spec(spec: TrainingSpec, path: Path, *, timeout: float = 240) -> Finished:
    """Run the recipe on ``spec`` (saved at ``path``) to the end."""
    spec.save(path)
    proc = subprocess.run(
        launch_command(path, spec.nproc), capture_output=True, text=True, timeout=timeout
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return Finished(proc.returncode, events, proc.stderr)


def start_spec(spec: TrainingSpec, path: Path) -> subprocess.Popen[str]:
    spec.save(path)
    return subprocess.Popen(
        launch_command(path, spec.nproc),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def read_events(proc: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)

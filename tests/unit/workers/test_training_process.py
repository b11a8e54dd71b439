"""The training subprocess wrapper: events, a child that will not exit, how long a child has
been quiet, and the worker's folders kept out of what the tenant reads of a failure."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from workers.jobs.subprocess_io import TrainingProcess, redact_paths


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


def test_silence_is_counted_from_the_latest_event(tmp_path: Path) -> None:
    proc = _child(
        tmp_path,
        'import time; time.sleep(1); print(\'{"type": "metrics"}\', flush=True); time.sleep(30)',
    )
    try:
        assert proc.events.get(timeout=30) == {"type": "metrics"}
        assert proc.silent_for() < 0.5  # not since the start, a second or more ago
        time.sleep(0.6)
        assert proc.silent_for() >= 0.6
    finally:
        proc.stop(grace_seconds=1)
        proc.wait()


WORKDIR = Path("/srv/loraplex/work/ftjob-abc/attempt-2")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "base model folder /srv/loraplex/models/llama has no *.safetensors weights",
            "base model folder <path> has no *.safetensors weights",
        ),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: "
            "'/srv/loraplex/work/ftjob-abc/attempt-2/resume/adapter_model.safetensors'",
            "FileNotFoundError: [Errno 2] No such file or directory: "
            "'resume/adapter_model.safetensors'",
        ),
        (
            'File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 3',
            'File "<path>", line 3',
        ),
        ("cannot open /data/cache/tokenized/k.safetensors.", "cannot open <path>."),
        (
            "PosixPath('/tmp/a') (at /tmp/b) [/tmp/c] x=/tmp/d,/tmp/e",
            "PosixPath('<path>') (at <path>) [<path>] x=<path>,<path>",
        ),
        ("storage file:///data/objects/x failed", "storage <path> failed"),
        ("see /srv/app/run.py:42", "see <path>:42"),
        # The work folder's name is not a prefix of another attempt's.
        ("/srv/loraplex/work/ftjob-abc/attempt-22/spec.json", "<path>"),
        ("/srv/loraplex/work/ftjob-abc/attempt-2", "<path>"),
        # Not paths: rates, fractions, URLs.
        (
            "CUDA out of memory at 12.5 tokens/s, n/a; see https://pytorch.org/docs/x a / b",
            "CUDA out of memory at 12.5 tokens/s, n/a; see https://pytorch.org/docs/x a / b",
        ),
    ],
)
def test_absolute_paths_are_kept_out_of_failure_messages(text: str, shown: str) -> None:
    assert redact_paths(text, WORKDIR) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # Folders with a space in their name are found whole, not cut at the space.
        ("no file '/srv/My Work/ftjob-abc/attempt-2/resume/x.bin'", "no file 'resume/x.bin'"),
        ("/data/My Models/tiny/config.json is missing", "<path> is missing"),
        ("cannot read file:///data/My Models/tiny.", "cannot read <path>."),
        ("/data/My Models", "<path>"),
        ("paths=/usr/lib:/data/My Models/x", "paths=<path>:<path>"),  # a PATH-like list
        # Home-relative paths.
        ("see ~/.cache/huggingface/x and ~svc/lib/y", "see <path> and <path>"),
        # A known folder's text inside a URL or a longer name is not a path of ours.
        ("https://host/data/My Models/x", "https://host/data/My Models/x"),
        ("/data/My Modelsx/y z", "<path> Modelsx/y z"),
    ],
)
def test_known_folders_are_redacted_whole(text: str, shown: str) -> None:
    workdir = Path("/srv/My Work/ftjob-abc/attempt-2")
    assert redact_paths(text, workdir, ["/data/My Models", "relative/ignored"]) == shown

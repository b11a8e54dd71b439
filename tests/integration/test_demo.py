"""`make demo`'s script, run as CI runs it: embedded defaults, non-interactive, asserted on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_answers_and_notifies_and_leaves_nothing_running(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--data-dir",
            str(tmp_path / "state"),
            "--summary",
            str(summary_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    log = (tmp_path / "state" / "up.log").read_text(errors="replace")[-3000:]
    assert summary_path.exists(), result.stdout[-3000:] + result.stderr[-3000:] + log
    summary = json.loads(summary_path.read_text())
    assert result.returncode == 0, (summary, result.stdout[-3000:], log)
    assert summary["job_status"] == "succeeded"
    # The fine-tuned model gives the dataset's answers; the base model gives none of them.
    assert summary["base_exact"] == 0
    assert summary["tuned_exact"] >= summary["questions"] - 1
    assert summary["webhook_verified"] is True
    # `loraplex up` (API + gateway, worker, vLLM) stopped cleanly: no pid of it is left.
    assert len(summary["stopped_pids"]) >= 3
    assert summary["left_running"] == []

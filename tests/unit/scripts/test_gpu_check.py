"""scripts/gpu_check: stops cleanly without CUDA, and every section runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=180,
        check=False,
    )


def test_shell_wrapper_parses() -> None:
    done = subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / "gpu_check.sh")], check=False)
    assert done.returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_stops(tmp_path: Path) -> None:
    done = _run(tmp_path)

    assert done.returncode == 0, done.stderr
    assert "torch: " in done.stdout
    assert "no CUDA: skipping GPU checks" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["skipped"] == "no CUDA"
    assert list(report["sections"]) == ["environment"]


def test_every_section_runs_on_cpu_with_a_tiny_model(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        *("--device", "cpu", "--preset", "tiny", "--steps", "6", "--warmup", "2"),
        *("--batch", "2", "--seq", "64", "--matmul-size", "256"),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "environment": "ok",
        "bf16 matmul peak": "ok",
        "build bench model": "ok",
        "attention backends": "ok",
        "LoRA training": "ok",
        "packed sequences": "ok",
        "QLoRA": "skipped",
    }
    training = sections["LoRA training"]
    assert training["base weights unchanged"] is True
    assert training["lora_B moved"] == "14/14"
    packing = sections["packed sequences"]
    # With the block-diagonal mask, float32 packing matches the sequences run alone; without
    # it the later sequences see the earlier ones.
    assert packing["sdpa float32"]["packed_vs_alone"] < 1e-4
    assert packing["sdpa float32"]["no_mask"] > 1e-2

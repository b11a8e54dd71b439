"""scripts/gpu_check: stops cleanly without CUDA, every section runs on the CPU, wheels slim."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
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
        timeout=480,
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
        *("--recipe-steps", "6", "--recipe-examples", "8"),
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
        "SDPA kernels": "ok",
        "project recipe: SFT packed": "ok",
        "project recipe: SFT padded": "ok",
        "project recipe: DPO": "ok",
        "project recipe: QLoRA": "skipped",
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
    kernels = sections["SDPA kernels"]
    assert "_scaled_dot_product" in kernels["packed, sdpa_varlen (recipe SFT)"]
    packed = sections["project recipe: SFT packed"]
    assert packed["started"] == {
        "device": "cpu",
        "dtype": packed["started"]["dtype"],
        "attn": "sdpa_varlen",
        "total_steps": 6,
    }
    assert packed["events"] == {"started": 1, "metrics": 6, "done": 1}
    assert packed["adapter"].startswith("ok: safetensors")
    assert sections["project recipe: SFT padded"]["started"]["attn"] == "sdpa"
    # The recipe runs under the probe, which reports what the loaded base is made of.
    assert packed["base model"]["plain Linear"] > 0
    assert "Linear4bit" not in packed["base model"]
    assert sections["project recipe: QLoRA"]["reason"] == "no CUDA"


def test_only_runs_the_named_sections(tmp_path: Path) -> None:
    done = _run(tmp_path, "--device", "cpu", "--preset", "tiny", "--only", "qlora,peft-qlora")

    assert done.returncode == 0, done.stdout + done.stderr
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "environment": "ok",
        "build bench model": "ok",
        "project recipe: QLoRA": "skipped",
        "QLoRA": "skipped",
    }
    assert "skipped: no CUDA" in done.stdout


def test_only_rejects_an_unknown_section(tmp_path: Path) -> None:
    done = _run(tmp_path, "--only", "qlora,nope")

    assert done.returncode == 2
    assert "unknown section nope" in done.stderr


def test_pruned_wheel_loses_the_matched_files_and_their_record_lines(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    wheel = tmp_path / "pyarrow-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    files = {
        "pyarrow/__init__.py": "x",
        "pyarrow/libarrow.so.2600": "keep",
        "pyarrow/libarrow_python.so": "dup",
        "pyarrow/libarrow_python.so.2600": "soname",
        "pyarrow/libarrow_flight.so.2600": "rpc",
        "pyarrow/tests/test_x.py": "t",
        "pyarrow/lib.pyx": "src",
    }
    record = "".join(f"{name},sha256=x,1\n" for name in files) + "pyarrow-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as out:
        for name, text in files.items():
            out.writestr(name, text)
        out.writestr("pyarrow-1.0.dist-info/RECORD", record)

    gpu_check._prune_wheel(wheel, gpu_check.PRUNED["pyarrow"])

    with zipfile.ZipFile(wheel) as src:
        names = set(src.namelist())
        kept_record = src.read("pyarrow-1.0.dist-info/RECORD").decode().splitlines()
    assert names == {
        "pyarrow/__init__.py",
        "pyarrow/libarrow.so.2600",
        "pyarrow/libarrow_python.so.2600",
        "pyarrow-1.0.dist-info/RECORD",
    }
    assert {line.split(",")[0] for line in kept_record} == names


def test_bitsandbytes_keeps_its_cuda_13_and_cpu_libraries_only() -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    pattern = gpu_check.PRUNED["bitsandbytes"]
    libs = ["cuda118", "cuda121", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026", "cpu"]
    names = [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in libs]

    kept = [n for n in names if not pattern.search(n)]

    assert kept == [
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_cuda132.so",
        "bitsandbytes/libbitsandbytes_cpu.so",
    ]
    assert not pattern.search("bitsandbytes/functional.py")
    carried = {r.split("==")[0] for r in gpu_check.CARRIED}
    assert "bitsandbytes" in carried and not carried & {"pyarrow", "pandas"}

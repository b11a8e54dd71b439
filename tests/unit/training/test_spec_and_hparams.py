"""The job spec's JSON contract, the launcher's argv, and "auto" hyperparameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from workers.training.hparams import resolve_auto
from workers.training.launcher import launch_command
from workers.training.spec import SpecError, TrainingSpec

REQUIRED = {
    "method": "sft",
    "base_model_path": "/models/tiny",
    "base_model_name": "tiny",
    "train_data": "/data/train.safetensors",
    "output_dir": "/out/adapter",
    "checkpoint_dir": "/out/checkpoints",
}


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    spec = TrainingSpec(**REQUIRED, target_modules=["q_proj", "v_proj"], eval_every_steps=5)

    again = TrainingSpec.load(spec.save(tmp_path / "spec.json"))

    assert again == spec == TrainingSpec.from_json(spec.to_json())
    assert json.loads(spec.to_json())["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "ppo"}, "method must be one of sft, dpo"),
        ({"learning_rate": 0}, r"learning_rate must be in \(0.0, \)"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"quantization": "2bit"}, "quantization must be one of"),
        ({"target_modules": "attention"}, "target_modules must be"),
        ({"lr": 1e-4}, "unknown spec field"),
    ],
)
def test_bad_specs_are_refused_with_the_field_named(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        TrainingSpec.from_dict({**REQUIRED, **change})


def test_missing_fields_are_listed() -> None:
    with pytest.raises(SpecError, match=r"missing spec field.*base_model_name.*train_data"):
        TrainingSpec.from_dict({"method": "sft", "base_model_path": "x"})


def test_launch_command_runs_this_interpreter() -> None:
    assert launch_command("/s.json") == [sys.executable, "-m", "workers.training.run", "/s.json"]
    assert launch_command("/s.json", 2)[-2:] == ["--nproc", "2"]


def test_auto_hyperparameters_follow_the_dataset() -> None:
    small = resolve_auto({"n_epochs": "auto"}, n_examples=20, mean_tokens=100, method="sft")
    medium = resolve_auto({}, n_examples=1000, mean_tokens=300, method="sft", context_length=4096)
    large = resolve_auto({}, n_examples=50_000, mean_tokens=3000, method="sft")

    assert small["n_epochs"] == 5 and small["batch_size"] == 1
    assert medium["n_epochs"] == 3 and medium["batch_size"] == 16
    assert large["n_epochs"] == 1 and large["batch_size"] == 5  # ~16k tokens per step
    assert medium["max_seq_len"] == 2048
    assert medium["learning_rate"] == pytest.approx(2e-4)
    assert (medium["lora_rank"], medium["lora_alpha"], medium["lora_dropout"]) == (16, 32, 0.0)
    assert "beta" not in medium


def test_explicit_values_win_and_the_multiplier_scales_the_base_rate() -> None:
    hyper = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0, "beta": "auto"}

    out = resolve_auto(hyper, n_examples=500, mean_tokens=80, method="dpo", context_length=1024)

    assert (out["n_epochs"], out["batch_size"], out["beta"], out["max_seq_len"]) == (
        2,
        4,
        0.1,
        1024,
    )
    assert out["learning_rate"] == pytest.approx(1e-5)
    assert "learning_rate_multiplier" not in out

"""'auto' hyperparameters resolve to numbers that depend on the data, never override choices."""

from __future__ import annotations

from workers.jobs.hyperparameters import BASE_LEARNING_RATE, resolve_auto

AUTO = {
    "n_epochs": "auto",
    "batch_size": "auto",
    "learning_rate_multiplier": "auto",
    "lora_rank": "auto",
    "lora_alpha": "auto",
}


def test_small_dataset_gets_more_epochs_and_small_batches() -> None:
    resolved = resolve_auto(AUTO, n_examples=12, method="sft")
    assert resolved["n_epochs"] == 9  # ceil(100 / 12)
    assert resolved["batch_size"] == 1
    assert resolved["learning_rate"] == BASE_LEARNING_RATE
    assert (resolved["lora_rank"], resolved["lora_alpha"]) == (16, 32)


def test_large_dataset_is_capped() -> None:
    resolved = resolve_auto(AUTO, n_examples=100_000, method="sft")
    assert resolved["n_epochs"] == 1
    assert resolved["batch_size"] == 32


def test_explicit_values_are_kept() -> None:
    params = {**AUTO, "n_epochs": 2, "learning_rate_multiplier": 5.0, "lora_rank": 8, "beta": 0.3}
    resolved = resolve_auto(params, n_examples=500, method="dpo")
    assert "n_epochs" not in resolved and "lora_rank" not in resolved and "beta" not in resolved
    assert resolved["learning_rate"] == 5.0 * BASE_LEARNING_RATE
    assert resolved["lora_alpha"] == 16


def test_dpo_beta_default() -> None:
    assert resolve_auto({**AUTO, "beta": "auto"}, n_examples=50, method="dpo")["beta"] == 0.1

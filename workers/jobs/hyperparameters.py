"""Turning OpenAI-style ``"auto"`` hyperparameters into numbers, once the data is known.

The choices follow what OpenAI documents for its fine-tuning defaults where it documents them,
and common LoRA practice elsewhere; each is a starting point a tenant can override.
"""

from __future__ import annotations

import math
from typing import Any

# LoRA adapters tolerate ~10x the full fine-tuning rate; 2e-4 is the usual AdamW peak.
BASE_LEARNING_RATE = 2e-4
# Epochs are chosen so a job sees between these many examples in total.
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3
MAX_DEFAULT_EPOCHS = 25


def _epochs(n_examples: int) -> int:
    if n_examples * DEFAULT_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / max(n_examples, 1)))
    if n_examples * DEFAULT_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return DEFAULT_EPOCHS


def _batch_size(n_examples: int) -> int:
    # About 0.2% of the data per step, within 1..32: small sets get many small steps.
    return max(1, min(32, round(n_examples * 0.002)))


def resolve_auto(params: dict[str, Any], *, n_examples: int, method: str) -> dict[str, Any]:
    """Concrete values for every "auto" field of ``params`` (OpenAI's shape plus LoRA fields).

    Returns the fields to overwrite, including ``learning_rate`` (the multiplier times
    BASE_LEARNING_RATE), which the recipe needs and OpenAI's object does not show.
    """
    resolved: dict[str, Any] = {}
    if params.get("n_epochs", "auto") == "auto":
        resolved["n_epochs"] = _epochs(n_examples)
    if params.get("batch_size", "auto") == "auto":
        resolved["batch_size"] = _batch_size(n_examples)
    multiplier = params.get("learning_rate_multiplier", "auto")
    if multiplier == "auto":
        multiplier = resolved["learning_rate_multiplier"] = 1.0
    resolved["learning_rate"] = BASE_LEARNING_RATE * float(multiplier)
    rank = params.get("lora_rank", "auto")
    if rank == "auto":
        rank = resolved["lora_rank"] = 16
    if params.get("lora_alpha", "auto") == "auto":
        resolved["lora_alpha"] = 2 * int(rank)
    if method == "dpo" and params.get("beta", "auto") == "auto":
        resolved["beta"] = 0.1
    return resolved

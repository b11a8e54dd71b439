"""Concrete hyperparameters for a job whose request left some of them "auto".

The worker calls ``resolve_auto`` in its validation stage, once it knows the dataset's size and
token lengths, and records the result on the job (OpenAI reports resolved values the same way).
The rules, and why:

* ``n_epochs``: 3 (OpenAI's default target), stretched so that training sees at least 100 and at
  most 25,000 examples in total: tiny datasets get more passes (at most 25), huge ones fewer (at
  least 1). The same bounds OpenAI publishes for its own "auto".
* ``batch_size``: a power of two near ``n_examples / 64``, from 1 to 16, so that small datasets
  still get ~64 optimizer steps per epoch and large ones do not take steps too small to use the
  hardware; lowered further so that a step holds at most ~16k tokens (memory on a GPU worker).
* ``learning_rate``: ``learning_rate_multiplier`` (default 1) times a base rate for LoRA: 2e-4 for
  SFT (the usual LoRA rate, ~10x full fine-tuning), 5e-6 for DPO (preference tuning moves the
  policy by small margins; larger rates collapse the log-ratios).
* ``lora_rank`` 16 and ``lora_alpha`` 2x rank: enough capacity for style and facts at a small
  adapter size; alpha/rank = 2 keeps the update scale independent of the rank chosen.
* ``lora_dropout`` 0: dropout helps little at these ranks and costs speed.
* ``beta`` (DPO) 0.1: trl's and the DPO paper's default.
* ``max_seq_len``: the model's context, capped at 2048 (memory and attention cost grow with it;
  longer examples are truncated or rejected as the job says).
"""

from __future__ import annotations

import math
from typing import Any

BASE_LEARNING_RATE = {"sft": 2e-4, "dpo": 5e-6}
MIN_EXAMPLES_SEEN, MAX_EXAMPLES_SEEN = 100, 25_000
DEFAULT_EPOCHS, MAX_EPOCHS = 3, 25
MAX_BATCH, MAX_TOKENS_PER_STEP = 16, 16_384
DEFAULT_RANK = 16
MAX_SEQ_LEN = 2048


def resolve_auto(
    hyper: dict[str, Any],
    *,
    n_examples: int,
    mean_tokens: float,
    method: str,
    context_length: int | None = None,
) -> dict[str, Any]:
    """``hyper`` with every "auto" (or missing) value replaced by a concrete one.

    Keys: n_epochs, batch_size, learning_rate_multiplier -> learning_rate, lora_rank,
    lora_alpha, lora_dropout, max_seq_len, and beta for DPO. Values given explicitly are kept
    (learning_rate_multiplier still scales the base rate); other keys pass through unchanged.
    """
    if method not in BASE_LEARNING_RATE:
        raise ValueError(f"method must be 'sft' or 'dpo', got {method!r}")
    if n_examples < 1:
        raise ValueError("n_examples must be at least 1")
    out = {k: v for k, v in hyper.items() if k != "learning_rate_multiplier"}

    out["n_epochs"] = _given(hyper, "n_epochs") or auto_epochs(n_examples)
    out["batch_size"] = _given(hyper, "batch_size") or auto_batch_size(n_examples, mean_tokens)
    multiplier = _given(hyper, "learning_rate_multiplier") or 1.0
    out["learning_rate"] = _given(hyper, "learning_rate") or BASE_LEARNING_RATE[method] * float(
        multiplier
    )
    rank = _given(hyper, "lora_rank") or DEFAULT_RANK
    out["lora_rank"] = rank
    out["lora_alpha"] = _given(hyper, "lora_alpha") or 2 * rank
    dropout = _given(hyper, "lora_dropout")
    out["lora_dropout"] = 0.0 if dropout is None else dropout
    out["max_seq_len"] = _given(hyper, "max_seq_len") or min(
        MAX_SEQ_LEN, context_length or MAX_SEQ_LEN
    )
    if method == "dpo":
        out["beta"] = _given(hyper, "beta") or 0.1
    else:
        out.pop("beta", None)
    return out


def auto_epochs(n_examples: int) -> int:
    if n_examples * DEFAULT_EPOCHS < MIN_EXAMPLES_SEEN:
        return min(MAX_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / n_examples))
    if n_examples * DEFAULT_EPOCHS > MAX_EXAMPLES_SEEN:
        return max(1, MAX_EXAMPLES_SEEN // n_examples)
    return DEFAULT_EPOCHS


def auto_batch_size(n_examples: int, mean_tokens: float) -> int:
    by_steps: int = 2 ** max(0, round(math.log2(max(1.0, n_examples / 64.0))))
    by_tokens = max(1, int(MAX_TOKENS_PER_STEP // max(1.0, mean_tokens)))
    return max(1, min(MAX_BATCH, by_steps, by_tokens))


def _given(hyper: dict[str, Any], key: str) -> Any:
    value = hyper.get(key)
    return None if value is None or value == "auto" else value

"""Packed examples do not see each other: each one's loss is the same as when it runs alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.training.attention import register
from workers.training.data import SFTExamples
from workers.training.packing import PackedCollator, PaddedCollator

LENGTHS = (37, 5, 60, 23)


@pytest.fixture(scope="module")
def examples() -> SFTExamples:
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 1000, size=n).astype(np.int32) for n in LENGTHS]
    # Targets everywhere but at each example's first token (as the tokenizer writes them).
    masks = [np.r_[0, np.ones(n - 1)].astype(np.uint8) for n in LENGTHS]
    offsets = np.r_[0, np.cumsum(LENGTHS)].astype(np.int64)
    return SFTExamples(np.concatenate(ids), np.concatenate(masks), offsets, {})


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        tiny_model, attn_implementation=register(), dtype=torch.float32
    )
    return loaded.eval()


def target_logprobs(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Log-probabilities of the targets of ``batch``, in order (what the loss sums)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return picked[labels != -100]


def alone(model: Any, examples: SFTExamples) -> list[torch.Tensor]:
    return [
        target_logprobs(model, PaddedCollator(examples, pad_token_id=0)([{"index": i}]))
        for i in range(len(LENGTHS))
    ]


def test_packed_examples_score_exactly_as_alone(model: Any, examples: SFTExamples) -> None:
    batch = PackedCollator(examples)([{"index": i} for i in range(len(LENGTHS))])

    packed = target_logprobs(model, batch)

    assert batch["input_ids"].shape == (1, sum(LENGTHS))  # no padding at all
    assert batch["position_ids"][0, LENGTHS[0]] == 0  # positions restart per example
    assert int(batch["num_real_tokens"]) == sum(LENGTHS)
    expected = torch.cat(alone(model, examples))
    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
    # Per example, the mean loss matches too (what a user would see as "its loss").
    at = 0
    for i, single in enumerate(alone(model, examples)):
        part = packed[at : at + len(single)]
        at += len(single)
        assert abs(float(-part.mean()) - float(-single.mean())) < 1e-5, i


def test_without_isolation_the_examples_would_differ(model: Any, examples: SFTExamples) -> None:
    """The comparison above can fail: plain causal attention over the packed row leaks."""
    batch = PackedCollator(examples)([{"index": i} for i in range(len(LENGTHS))])
    leaky = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    leaky["position_ids"] = torch.arange(sum(LENGTHS))[None]

    packed = target_logprobs(model, leaky)

    expected = torch.cat(alone(model, examples))
    assert (packed - expected).abs().max() > 1e-2


def test_padded_batches_score_as_alone(model: Any, examples: SFTExamples) -> None:
    model.config._attn_implementation = "sdpa"
    try:
        batch = PaddedCollator(examples, pad_token_id=0)([{"index": i} for i in range(4)])
        padded = target_logprobs(model, batch)
        expected = torch.cat(alone(model, examples))
    finally:
        model.config._attn_implementation = register()

    assert int(batch["num_real_tokens"]) == sum(LENGTHS)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=0)

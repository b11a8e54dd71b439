"""Tokenization for training: which tokens are targets, length limits, the file, the fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.datasets import DatasetFormat
from workers.training.data import (
    ChatEncoder,
    PreferenceExamples,
    SFTExamples,
    TokenizationError,
    load_tokenized,
    load_tokenizer,
    tokenize_to_file,
    tokenizer_fingerprint,
)
from workers.training.tiny_model import CHAT_TEMPLATE, IM_END

CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello, how can I help?", "weight": 0},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


def chat(content: str = "Paris.", **extra: Any) -> tuple[DatasetFormat, dict[str, Any]]:
    messages = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": content, **extra},
    ]
    return DatasetFormat.CHAT, {"messages": messages}


def preference(i: int) -> tuple[DatasetFormat, dict[str, Any]]:
    return DatasetFormat.DPO, {
        "input": {"messages": [{"role": "user", "content": f"Count to {i}."}]},
        "preferred_output": [{"role": "assistant", "content": " ".join(map(str, range(i)))}],
        "non_preferred_output": [{"role": "assistant", "content": "No."}],
    }


def targets(data: SFTExamples, i: int, tokenizer: Any) -> str:
    ids, mask = data.example(i)
    return str(tokenizer.decode([int(t) for t, m in zip(ids, mask, strict=True) if m]))


def test_only_weighted_assistant_tokens_are_targets(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)

    stats = tokenize_to_file(
        [(DatasetFormat.CHAT, CHAT)], tiny_model, tmp_path / "d", method="sft", max_seq_len=512
    )
    data = load_tokenized(tmp_path / "d")

    assert isinstance(data, SFTExamples)
    # The weight-0 reply is context only; the trained reply ends with the token that stops it.
    assert targets(data, 0, tokenizer) == "Paris." + IM_END
    ids, _ = data.example(0)
    assert tokenizer.decode([int(t) for t in ids]) == tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False
    )
    assert stats.examples == 1
    assert stats.total_tokens == len(ids)
    assert stats.trained_tokens == len(tokenizer.encode("Paris." + IM_END))


def test_template_without_generation_markers_gives_the_same_targets(tiny_model: Path) -> None:
    marked = ChatEncoder(load_tokenizer(tiny_model))
    plain_tokenizer = load_tokenizer(tiny_model)
    plain_tokenizer.chat_template = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", ""
    )
    plain = ChatEncoder(plain_tokenizer)
    two_replies = [*CHAT["messages"], {"role": "user", "content": "And Spain?"}]
    two_replies.append({"role": "assistant", "content": "Madrid."})

    assert marked.uses_generation_tags and not plain.uses_generation_tags
    assert plain.encode_chat(two_replies) == marked.encode_chat(two_replies)


def test_too_long_examples_are_truncated_or_rejected_and_listed(
    tiny_model: Path, tmp_path: Path
) -> None:
    records = [chat(), chat("word " * 200), chat(), chat("fine", weight=0)]

    cut = tokenize_to_file(records, tiny_model, tmp_path / "t", method="sft", max_seq_len=64)
    kept = tokenize_to_file(
        records, tiny_model, tmp_path / "r", method="sft", max_seq_len=64, on_overflow="reject"
    )

    assert (cut.truncated, cut.rejected, cut.skipped, cut.examples) == ([1], [], [3], 3)
    assert (kept.truncated, kept.rejected, kept.skipped, kept.examples) == ([], [1], [3], 2)
    truncated = load_tokenized(tmp_path / "t")
    assert isinstance(truncated, SFTExamples)
    assert int(truncated.lengths.max()) == 64


def test_truncation_that_leaves_nothing_to_train_skips_the_example(
    tiny_model: Path, tmp_path: Path
) -> None:
    long_question = {
        "messages": [
            {"role": "user", "content": "why " * 100},
            {"role": "assistant", "content": "Because."},
        ]
    }

    stats = tokenize_to_file(
        [chat(), (DatasetFormat.CHAT, long_question)],
        tiny_model,
        tmp_path / "d",
        method="sft",
        max_seq_len=32,
    )

    assert (stats.truncated, stats.skipped, stats.examples) == ([1], [1], 1)


def test_preference_triples_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)

    stats = tokenize_to_file(
        [preference(3), preference(5)], tiny_model, tmp_path / "p", method="dpo", max_seq_len=256
    )
    data = load_tokenized(tmp_path / "p")

    assert isinstance(data, PreferenceExamples)
    assert len(data) == stats.examples == 2
    prompt, chosen, rejected = data.triple(1)
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to 5."}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(chosen) == "0 1 2 3 4" + IM_END
    assert tokenizer.decode(rejected) == "No." + IM_END
    assert stats.trained_tokens == sum(
        len(c) + len(r) for _, c, r in (data.triple(i) for i in range(2))
    )


def test_long_preference_keeps_the_prompt_end_and_completion_starts(
    tiny_model: Path, tmp_path: Path
) -> None:
    long = (
        DatasetFormat.DPO,
        {
            "input": {"messages": [{"role": "user", "content": "x " * 100 + "END"}]},
            "preferred_output": [{"role": "assistant", "content": "yes " * 60}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        },
    )

    stats = tokenize_to_file([long], tiny_model, tmp_path / "p", method="dpo", max_seq_len=64)
    data = load_tokenized(tmp_path / "p")

    assert isinstance(data, PreferenceExamples)
    prompt, chosen, rejected = data.triple(0)
    assert stats.truncated == [0]
    assert len(prompt) + max(len(chosen), len(rejected)) <= 64
    assert (
        load_tokenizer(tiny_model).decode(prompt).endswith("END<|im_end|>\n<|im_start|>assistant\n")
    )


def test_method_and_format_must_agree(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizationError, match="example 1 is a preference"):
        tokenize_to_file(
            [chat(), preference(2)], tiny_model, tmp_path / "x", method="sft", max_seq_len=64
        )
    with pytest.raises(TokenizationError, match="example 0 is a chat example"):
        tokenize_to_file([chat()], tiny_model, tmp_path / "x", method="dpo", max_seq_len=64)


def test_the_file_is_safetensors_with_our_metadata(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    tokenize_to_file(
        [chat(), chat("Lyon.")], tiny_model, tmp_path / "d", method="sft", max_seq_len=64
    )

    with safe_open(str(tmp_path / "d"), framework="numpy") as handle:
        metadata = handle.metadata()
        arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert metadata["format"] == "loraplex-tokenized" and metadata["method"] == "sft"
    assert metadata["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_model)
    assert {k: v.dtype for k, v in arrays.items()} == {
        "input_ids": np.int32,
        "loss_mask": np.uint8,
        "offsets": np.int64,
    }
    assert arrays["offsets"][0] == 0 and arrays["offsets"][-1] == len(arrays["input_ids"])
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(TokenizationError, match="not a tokenized dataset"):
        load_tokenized(tmp_path / "junk")


def test_fingerprint_is_stable_and_follows_the_chat_template(
    tiny_model: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    first = tokenizer_fingerprint(tiny_model)

    assert tokenizer_fingerprint(tiny_model) == first == tokenizer_fingerprint(copy)
    (copy / "chat_template.jinja").write_text(CHAT_TEMPLATE + "{# changed #}")
    assert tokenizer_fingerprint(copy) != first

"""The tiny model builder writes a model that loads through the ordinary Auto* paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from workers.training.tiny_model import (  # noqa: E402 - after the importorskips
    IM_END,
    MARKER_FILE,
    PRESETS,
    build_tiny_model,
)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How many days are in a week?"},
    {"role": "assistant", "content": "There are seven days in a week."},
    {"role": "user", "content": "And in a fortnight?"},
    {"role": "assistant", "content": " Fourteen, 14!\nThat is two weeks."},
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_reloads_with_auto_classes_and_head_dim_64(tiny_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)

    assert model.config.model_type == "llama"
    assert model.config.head_dim == 64
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings is False
    assert len(tokenizer) <= model.config.vocab_size
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == "<|endoftext|>"
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["hidden_size"] == 128 and marker["seed"] == 0


def test_tokenizer_round_trips_text_and_bytes(tiny_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    text = "Café at 7:15 — 3 eggs, 250 g flour; naïve 🙂 questions?\n\tIndented."

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == text


def test_chat_template_and_assistant_mask(tiny_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)

    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    encoded = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )

    assert rendered.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert rendered.endswith(
        "<|im_start|>assistant\n Fourteen, 14!\nThat is two weeks.<|im_end|>\n"
    )
    assert prompt.endswith(
        "<|im_start|>user\nHow many days are in a week?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(ids) == len(mask)
    # The marked tokens are exactly each assistant reply plus the <|im_end|> that ends it.
    spans: list[list[int]] = []
    for i, (token, marked) in enumerate(zip(ids, mask, strict=True)):
        if marked:
            if not mask[i - 1]:
                spans.append([])
            spans[-1].append(token)
    expected = [m["content"] + IM_END for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == expected


def test_generation_runs_and_stops_on_im_end(tiny_dir: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    inputs = tokenizer.apply_chat_template(
        CONVERSATION[:2],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)

    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id


def test_same_seed_gives_identical_files(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_dir / name), name
    assert _sha256(other / "model.safetensors") != _sha256(tiny_dir / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(tiny_dir / "tokenizer.json")


def test_presets_keep_head_dim_64_and_bad_shapes_are_refused(tmp_path: Path) -> None:
    assert {spec.head_dim for spec in PRESETS.values()} == {64}

    with pytest.raises(ValueError, match="head_dim 64"):
        build_tiny_model(tmp_path / "bad", hidden_size=128, num_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        build_tiny_model(tmp_path / "bad", preset="huge")

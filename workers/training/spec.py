"""The training job spec: everything the recipe needs, as plain data that round-trips through JSON.

The worker writes a spec file and starts ``python -m workers.training.run SPEC.json``; the recipe
reads nothing else (no database, no environment-dependent defaults besides the hardware it runs
on). Each field's comment says what it controls and the trade-off of changing it.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from workers.training.errors import TrainingError

METHODS = ("sft", "dpo")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16")
PARALLELISMS = ("ddp", "fsdp")


class SpecError(ValueError):
    """The spec is malformed; the message names the field and what is wrong with it."""


@dataclass
class TrainingSpec:
    # "sft" (supervised, loss on assistant turns) or "dpo" (preference pairs).
    method: str
    # Local folder of the base model (config.json + *.safetensors + tokenizer files).
    base_model_path: str
    # The name the serving side knows the base model by; written as ``base_model_name_or_path`` in
    # adapter_config.json so that vLLM and peft resolve the adapter against the right base.
    base_model_name: str
    # Tokenized dataset written by ``data.tokenize_to_file`` (safetensors, see data.py).
    train_data: str
    # Final adapter folder: adapter_config.json + adapter_model.safetensors, nothing else.
    output_dir: str
    # Local checkpoints are written here as ``checkpoint-<step>/``; the parent uploads them.
    checkpoint_dir: str
    # Held-out tokenized dataset; None skips evaluation.
    valid_data: str | None = None
    # A checkpoint folder this recipe emitted earlier: training continues from it with optimizer,
    # scheduler and RNG state restored. It must come from a run with the same data and
    # hyperparameters.
    resume_from: str | None = None
    # Seeds adapter init, data order and dropout: same seed + data -> byte-identical adapter.
    seed: int = 0
    # Passes over the training data. More epochs fit small datasets better and risk memorising.
    n_epochs: int = 3
    # Examples (DPO: pairs) per optimizer step, packed or not, split over the processes. Larger
    # batches give smoother gradients and fewer, costlier steps.
    batch_size: int = 8
    # Peak learning rate of the adapter's AdamW. LoRA tolerates ~10x the full fine-tuning rate.
    learning_rate: float = 2e-4
    # Fraction of steps spent warming the rate up linearly from 0; it then decays linearly to 0.
    warmup_ratio: float = 0.0
    # LoRA rank: capacity of the update; memory and compute grow linearly with it.
    lora_rank: int = 16
    # LoRA scaling numerator (update scaled by alpha / rank); 2x rank is the common choice.
    lora_alpha: int = 32
    # Dropout on the LoRA input; regularises small datasets, costs a little speed.
    lora_dropout: float = 0.0
    # Modules that get adapters: "all-linear" (every linear layer but the LM head) or names such as
    # ["q_proj", "v_proj"]. Fewer modules train faster and learn less.
    target_modules: list[str] | str = "all-linear"
    # Weight-decomposed LoRA: often a little better at the same rank, ~1.5-2x slower per step.
    use_dora: bool = False
    # "4bit" (QLoRA, NF4) or "8bit" base weights: needs CUDA and bitsandbytes; saves memory, not
    # time.
    quantization: str = "none"
    # Longest example (tokens) the data may hold; the tokenizer truncates or rejects longer ones.
    # Memory grows with it; an example's attention cost grows with the square of its length.
    max_seq_len: int = 2048
    # SFT: concatenate each step's examples into one padding-free sequence, attention kept within
    # each example (packing.py). False pads every example to the step's longest.
    packing: bool = True
    # DPO temperature: higher keeps the policy closer to the reference (the base model).
    beta: float = 0.1
    # Write a resumable checkpoint every N optimizer steps; 0 = none except when paused. The last
    # step never gets one: the adapter is the output.
    checkpoint_every_steps: int = 0
    # Emit a metrics event every N optimizer steps.
    logging_steps: int = 1
    # Evaluate on valid_data every N steps; None = once, at the end.
    eval_every_steps: int | None = None
    # "auto": bfloat16 on CUDA with bf16 support and on CPUs with native bf16 dot products
    # (measured ~1.6x faster there, see model.py), float32 otherwise. CPU bf16 is autocast over
    # float32 weights.
    dtype: str = "auto"
    # Intra-op threads per process; None = the CPU cores available, split between processes.
    num_threads: int | None = None
    # Processes; >1 runs under torchrun, each taking batch_size / nproc examples per step.
    nproc: int = 1
    # How several processes share the work: "ddp" (each holds the whole model) or "fsdp" (the
    # model's weights, gradients and optimizer state are sharded across them: for base models
    # that do not fit one GPU). Ignored with one process.
    parallelism: str = "ddp"
    # Stop after this many optimizer steps (smoke tests, benchmarks); None = n_epochs of data.
    max_steps: int | None = None
    # A prompt (role/content messages) answered greedily with the finished adapter, reported in
    # the ``done`` event: the reference the train/serve parity check compares serving with.
    parity_messages: list[dict[str, Any]] | None = None
    # Tokens generated for that answer.
    parity_max_tokens: int = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError for the first field whose value cannot work."""
        _one_of("method", self.method, METHODS)
        _one_of("quantization", self.quantization, QUANTIZATIONS)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("parallelism", self.parallelism, PARALLELISMS)
        for name in ("base_model_path", "base_model_name", "train_data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise SpecError(f"{name} must be a non-empty string")
        if not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir:
            raise SpecError("checkpoint_dir must be a non-empty string")
        for name in ("n_epochs", "batch_size", "lora_rank", "lora_alpha", "logging_steps", "nproc"):
            _positive_int(name, getattr(self, name))
        _positive_int("max_seq_len", self.max_seq_len, minimum=8)
        if not isinstance(self.checkpoint_every_steps, int) or self.checkpoint_every_steps < 0:
            raise SpecError("checkpoint_every_steps must be an integer >= 0")
        for name in ("eval_every_steps", "num_threads", "max_steps"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SpecError("seed must be an integer")
        _finite("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _finite("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        _finite("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        _finite("beta", self.beta, low=0.0, low_open=True)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise SpecError('target_modules must be "all-linear" or a list of module names')
        elif not (
            isinstance(self.target_modules, list)
            and self.target_modules
            and all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise SpecError('target_modules must be "all-linear" or a non-empty list of names')
        if not isinstance(self.use_dora, bool) or not isinstance(self.packing, bool):
            raise SpecError("use_dora and packing must be booleans")
        _positive_int("parity_max_tokens", self.parity_max_tokens)
        if self.parity_messages is not None and not (
            isinstance(self.parity_messages, list)
            and self.parity_messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
                for m in self.parity_messages
            )
        ):
            raise SpecError("parity_messages must be a non-empty list of role/content messages")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSpec:
        if not isinstance(data, dict):
            raise SpecError("a training spec must be a JSON object")
        # Unknown keys are refused rather than ignored: a misspelt field would silently train
        # with the default.
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise SpecError(f"unknown spec field(s): {', '.join(unknown)}")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise SpecError(f"missing spec field(s): {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"the spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> TrainingSpec:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read the spec file {path}: {exc.strerror}") from exc
        return cls.from_json(text)

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_text(self.to_json() + "\n", encoding="utf-8")
        return out


def _one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _positive_int(name: str, value: object, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _finite(
    name: str,
    value: object,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise SpecError(f"{name} must be a finite number; got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        bounds = f"{'(' if low_open else '['}{low}, {'' if high is None else high}"
        bounds += ")" if high is None or high_open else "]"
        raise SpecError(f"{name} must be in {bounds}; got {value!r}")


def check_base_model(path: str) -> Path:
    """The base model folder, or a TrainingError saying what is missing (cheap: no model loaded)."""
    folder = Path(path)
    if not folder.is_dir():
        raise TrainingError(f"base model folder {path} does not exist")
    if not (folder / "config.json").is_file():
        raise TrainingError(f"base model folder {path} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise TrainingError(
            f"base model folder {path} has no *.safetensors weights (only safetensors are loaded)"
        )
    return folder


def check_inputs(spec: TrainingSpec) -> None:
    """Fail fast, before the slow imports and loads, when the spec cannot run here."""
    check_base_model(spec.base_model_path)
    if spec.quantization != "none":
        import torch

        if not torch.cuda.is_available():
            raise TrainingError(
                f"quantization {spec.quantization!r} (QLoRA) needs a CUDA GPU; this worker has none"
            )
    for name in ("train_data", "valid_data"):
        path = getattr(spec, name)
        if path is not None and not Path(path).is_file():
            raise TrainingError(f"{name} {path} does not exist")
    if spec.resume_from is not None:
        folder = Path(spec.resume_from)
        if not (folder / "trainer_state.json").is_file():
            raise TrainingError(
                f"resume_from {spec.resume_from} is not a checkpoint folder of this recipe"
            )
        if not (folder / "adapter_model.safetensors").is_file():
            raise TrainingError(f"resume_from {spec.resume_from} has no adapter_model.safetensors")

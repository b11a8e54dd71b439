"""The training recipe, top to bottom: check inputs -> load -> build the trainer -> train -> save.

One process of a run; under torchrun every process runs this, and only rank 0 reports progress
and writes files (the trainer itself writes checkpoints from rank 0 too).

Security: the model comes from ``*.safetensors`` only, without remote code (model.py), and the
data is the worker's safetensors file (data.py). Resuming restores the optimizer, scheduler and
RNG state from files the trainer wrote into our own checkpoints (``optimizer.pt``,
``scheduler.pt``, ``rng_state*.pth``); transformers reads them with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only. The
adapter weights of a checkpoint are safetensors; the trainer also pickles its arguments into
``training_args.bin``, which nothing here ever loads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workers.training.data import (
    PreferenceExamples,
    SFTExamples,
    TokenizationError,
    TokenizedExamples,
    load_tokenized,
    load_tokenizer,
    tokenizer_fingerprint,
)
from workers.training.errors import TrainingError
from workers.training.events import EventStream
from workers.training.model import Runtime, choose_runtime, load_base_model
from workers.training.progress import EventCallback, PauseRequest, RunTotals, TokenMeter
from workers.training.spec import TrainingSpec, check_inputs

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class World:
    rank: int
    local_size: int
    size: int

    @classmethod
    def from_env(cls) -> World:
        # torchrun sets these; a plain process is rank 0 of 1.
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            size=int(os.environ.get("WORLD_SIZE", "1")),
        )


def run_training(spec: TrainingSpec, events: EventStream, *, started: float | None = None) -> int:
    """Train as ``spec`` says, reporting on ``events``; return the exit code.

    ``started`` is the ``time.monotonic()`` the process began at (for the ``seconds`` metric).
    """
    started = time.monotonic() if started is None else started
    world = World.from_env()

    # 1. Inputs, checked before anything slow is loaded, with messages a user can act on.
    check_inputs(spec)
    runtime = choose_runtime(spec, local_world_size=world.local_size)
    torch.set_num_threads(runtime.threads)
    train = _load_data(spec.train_data, spec, "train_data")
    valid = _load_data(spec.valid_data, spec, "valid_data") if spec.valid_data else None

    # 2. Model and tokenizer.
    tokenizer = load_tokenizer(spec.base_model_path)
    model = load_base_model(spec, runtime)
    _check_vocab(model, train, valid)

    # 3. Trainer, with the callback that reports progress and handles pause.
    pause = PauseRequest()
    pause.install()
    meter = TokenMeter()
    totals = RunTotals.load(spec.resume_from)
    info: dict[str, Any] = {
        "device": runtime.device,
        "dtype": runtime.dtype_name,
        "attn": runtime.attn,
        "examples": len(train),
    }
    progress = EventCallback(
        events, pause, meter, totals, runtime_info=info, resumed=spec.resume_from is not None
    )
    args = trainer_arguments(spec, runtime, has_valid=valid is not None, world_size=world.size)
    if uses_fsdp(spec, world.size):
        args.update(fsdp_arguments(model))
    trainer: Any
    if isinstance(train, SFTExamples):
        from workers.training.sft import build_sft_trainer

        assert valid is None or isinstance(valid, SFTExamples)
        trainer, per_step = build_sft_trainer(
            spec,
            model,
            tokenizer,
            train,
            valid,
            args=args,
            world_size=world.size,
            meter=meter,
            callbacks=[progress],
        )
    else:
        from workers.training.dpo import build_dpo_trainer

        assert valid is None or isinstance(valid, PreferenceExamples)
        trainer, per_step = build_dpo_trainer(
            spec,
            model,
            tokenizer,
            train,
            valid,
            args=args,
            world_size=world.size,
            meter=meter,
            callbacks=[progress],
        )
    info["examples_per_step"] = round(per_step, 2)
    _quiet(trainer)

    # 4. Train (or continue); a pause ends here with its checkpoint written.
    trainer.train(resume_from_checkpoint=spec.resume_from)
    if progress.paused_at is not None:
        events.emit("paused", step=progress.paused_at)
        return 0
    if valid is not None and progress.last_eval_step != trainer.state.global_step:
        trainer.evaluate()

    # 5. The adapter: two files, written by rank 0 once every process is done; then the
    #    reference answer for the train/serve parity check.
    parity = None
    sharded = uses_fsdp(spec, world.size)
    # Under FSDP every process holds a shard: gathering the full weights is a collective.
    full_state = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if world.rank == 0:
        trained = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter(trained, spec, state_dict=full_state)
        # The parity sample needs the whole model in one process; a sharded run skips it (the
        # worker then reports the check as skipped).
        if spec.parity_messages and not sharded:
            parity = parity_sample(
                trained,
                tokenizer,
                spec.parity_messages,
                spec.parity_max_tokens,
                upcast=spec.quantization == "none",
            )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    events.emit(
        "done",
        adapter_dir=spec.output_dir,
        parity=parity,
        metrics={
            "train_loss": totals.last.get("train_loss"),
            "valid_loss": totals.last.get("valid_loss"),
            "trained_tokens": totals.trained_tokens,
            "steps": trainer.state.global_step,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return 0


def trainer_arguments(
    spec: TrainingSpec, runtime: Runtime, *, has_valid: bool, world_size: int
) -> dict[str, Any]:
    """Trainer settings shared by SFT and DPO (trl's defaults are overridden where they differ)."""
    evaluate = has_valid and spec.eval_every_steps is not None
    return {
        "output_dir": spec.checkpoint_dir,
        "num_train_epochs": spec.n_epochs,
        "max_steps": spec.max_steps or -1,
        "learning_rate": spec.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": spec.warmup_ratio,  # a float below 1 is a fraction of the steps
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "gradient_accumulation_steps": 1,
        # Recomputing activations costs ~30% more compute; only QLoRA on a GPU needs the memory.
        "activation_checkpointing": spec.quantization != "none",
        "bf16": runtime.dtype == torch.bfloat16,
        "fp16": False,
        "use_cpu": runtime.device == "cpu",
        "seed": spec.seed,
        "data_seed": spec.seed,
        "logging_strategy": "steps",
        "logging_steps": spec.logging_steps,
        "save_strategy": "steps" if spec.checkpoint_every_steps else "no",
        "save_steps": spec.checkpoint_every_steps or 1,
        "save_total_limit": None,  # the parent uploads and deletes checkpoints
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": spec.eval_every_steps if evaluate else None,
        "report_to": "none",
        "disable_tqdm": True,
        "log_level": "warning",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": runtime.device == "cuda",
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,
        # Naming a backend makes accelerate expect a process group, so only under torchrun.
        "ddp_backend": "gloo" if runtime.device == "cpu" and world_size > 1 else None,
    }


@torch.no_grad()
def parity_sample(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_tokens: int,
    *,
    upcast: bool = True,
) -> dict[str, Any]:
    """Greedy answer of the trained adapter to ``messages``, as serving will be asked for it.

    Generated in float32 whatever the training dtype (bf16 rounding would flip near-ties that a
    float32 server does not), with the chat template and stop tokens of the base model.
    Quantized (4/8-bit) bases are not upcast: their weights cannot be.
    """
    was_training = model.training
    model.eval()
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        device = next(model.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):
            output = (model.float() if upcast else model).generate(
                input_ids=ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        new_tokens = output[0, ids.shape[1] :].tolist()
    finally:
        model.train(was_training)
    return {
        "messages": messages,
        "max_tokens": max_tokens,
        "token_ids": new_tokens,
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
    }


def uses_fsdp(spec: TrainingSpec, world_size: int) -> bool:
    return spec.parallelism == "fsdp" and world_size > 1


def fsdp_arguments(model: Any) -> dict[str, Any]:
    """FSDP through the Trainer: wrap each decoder layer (the model names its own layer class),
    keep the original parameters visible so LoRA's few trainable ones can be told apart."""
    layers = list(getattr(model, "_no_split_modules", None) or [])
    config: dict[str, Any] = {"use_orig_params": True}
    if layers:
        config["transformer_layer_cls_to_wrap"] = layers
    return {"fsdp": True, "fsdp_config": config}


def save_adapter(model: Any, spec: TrainingSpec, state_dict: dict[str, Any] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into spec.output_dir, atomically.

    ``base_model_name_or_path`` is the serving name of the base model, not the local folder the
    worker trained from. ``target_modules`` is written sorted (peft writes a set, whose order
    changes from process to process, and the same run must give the same bytes); "all-linear",
    which peft expands to every full module path, is written as the short names ("q_proj", ...),
    which match the same modules by suffix. Tokenizer
    files are not copied: an adapter is served on its base model, whose tokenizer it was
    trained with.
    """
    out = Path(spec.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # save_embedding_layers=False: embeddings are never trained here (and peft would look
        # up the base model's config by name to decide).
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(
            str(staging), safe_serialization=True, save_embedding_layers=False, **extra
        )
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = spec.base_model_name
        modules = config.get("target_modules")
        if isinstance(modules, list):
            if spec.target_modules == "all-linear":  # peft expanded it to every full path
                modules = {str(m).rsplit(".", 1)[-1] for m in modules}
            config["target_modules"] = sorted(modules)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _load_data(path: str, spec: TrainingSpec, name: str) -> TokenizedExamples:
    try:
        data = load_tokenized(path)
    except TokenizationError as exc:
        raise TrainingError(f"{name}: {exc}") from exc
    method = data.metadata.get("method")
    if method != spec.method:
        raise TrainingError(
            f"{name} was tokenized for {method}, but the job's method is {spec.method}"
        )
    if len(data) == 0:
        raise TrainingError(f"{name} holds no examples")
    expected = tokenizer_fingerprint(spec.base_model_path)
    if data.metadata.get("tokenizer_fingerprint") != expected:
        raise TrainingError(
            f"{name} was tokenized with another tokenizer or chat template than the base "
            "model's; tokenize it again"
        )
    longest = _longest(data)
    if longest > spec.max_seq_len:
        raise TrainingError(
            f"{name} has an example of {longest} tokens, more than max_seq_len {spec.max_seq_len}"
        )
    return data


def _longest(data: TokenizedExamples) -> int:
    if isinstance(data, SFTExamples):
        return int(data.lengths.max())
    import numpy as np

    prompt = np.diff(data.prompt_offsets)
    completion = np.maximum(np.diff(data.chosen_offsets), np.diff(data.rejected_offsets))
    return int((prompt + completion).max())


def _check_vocab(model: Any, *datasets: TokenizedExamples | None) -> None:
    vocab = int(model.get_input_embeddings().weight.shape[0])
    for data in datasets:
        if data is None:
            continue
        arrays = (
            [data.input_ids]
            if isinstance(data, SFTExamples)
            else [data.prompt_ids, data.chosen_ids, data.rejected_ids]
        )
        top = max((int(a.max()) for a in arrays if len(a)), default=0)
        if top >= vocab:
            raise TrainingError(f"token id {top} is outside the model's vocabulary of {vocab}")


def _quiet(trainer: Any) -> None:
    """Progress goes out as events; the trainer's own printing and progress bars are noise."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

"""Direct preference optimisation: trl's DPOTrainer on the worker's tokenized triples.

The reference policy is the base model itself: with a LoRA adapter and no ``ref_model``, trl
computes the reference log-probs with the adapter disabled, so there is no second copy of the
model in memory. One override: DPOTrainer always tokenizes its dataset from text, while ours is
tokenized already (data.py, with the same chat template), so ``_prepare_dataset`` passes it
through. Pairs are padded per batch, not packed: chosen and rejected of a pair must line up.
"""

from __future__ import annotations

from typing import Any

from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from workers.training.data import PreferenceExamples
from workers.training.progress import TokenMeter
from workers.training.spec import TrainingSpec


class PretokenizedDPOTrainer(DPOTrainer):
    def __init__(self, *args: Any, meter: TokenMeter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        # Checkpoints hold what resuming needs; the tokenizer is the base model's, unchanged.
        self.processing_class = None

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        return dataset  # prompt_ids / chosen_ids / rejected_ids, tokenized by data.py

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Rows are [chosen..., rejected...]; attention_mask marks real tokens, completion_mask
        # the tokens whose log-probs the loss uses.
        self.meter.add(inputs["attention_mask"].sum(), inputs["completion_mask"].sum())
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[no-untyped-call]

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No README.md next to the checkpoints: the parent uploads that folder as it is."""


def build_dpo_trainer(
    spec: TrainingSpec,
    model: Any,
    tokenizer: Any,
    train: PreferenceExamples,
    valid: PreferenceExamples | None,
    *,
    args: dict[str, Any],
    world_size: int,
    meter: TokenMeter,
    callbacks: list[Any],
) -> tuple[PretokenizedDPOTrainer, float]:
    """The trainer, and the number of pairs per optimizer step."""
    from workers.training.model import lora_config

    per_device = max(1, round(spec.batch_size / world_size))
    config = DPOConfig(
        **args,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        beta=spec.beta,
        max_length=spec.max_seq_len,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
    )
    trainer = PretokenizedDPOTrainer(
        model=model,
        args=config,
        train_dataset=_dataset(train),
        eval_dataset=None if valid is None else _dataset(valid),
        processing_class=tokenizer,
        peft_config=lora_config(spec),
        callbacks=callbacks,
        meter=meter,
    )
    return trainer, float(per_device * world_size)


def _dataset(data: PreferenceExamples) -> Any:
    from datasets import Dataset  # type: ignore[import-untyped]

    triples = [data.triple(i) for i in range(len(data))]
    return Dataset.from_dict(
        {
            "prompt_ids": [t[0] for t in triples],
            "chosen_ids": [t[1] for t in triples],
            "rejected_ids": [t[2] for t in triples],
        }
    )

"""Supervised fine-tuning: trl's SFTTrainer on batches of packed rows (see packing.py).

trl's SFTTrainer is used for what it does well here: its fused LM head scores the targets in
chunks without materialising the ``[tokens, vocab]`` logits, its metrics (token accuracy) and the
whole Trainer machinery (AdamW, schedule, checkpoint/resume, DDP). Two of its parts are bypassed,
on purpose:

* dataset preparation (``skip_prepare_dataset``): the worker tokenised the data already, with the
  exact assistant masks (data.py), and packing is ours (packing.py: padding-free, per-example
  attention, ``batch_size`` examples per step); the trainer's datasets hold only example indexes
  and the collators build each batch from the tokenized arrays;
* ``compute_loss``: trl's counts tokens from a 2-D ``attention_mask``, which packed batches do not
  have; ours computes the same loss (sum of target log-probs over the targets of the step, all
  processes) and counts real and target tokens with the batch.

Validation loss is the Trainer's: the mean over validation steps of each step's per-token loss
(steps hold ``batch_size`` examples, like training steps).
"""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from workers.training.data import SFTExamples
from workers.training.packing import PackedCollator, PaddedCollator
from workers.training.progress import TokenMeter
from workers.training.spec import TrainingSpec


class PackedSFTTrainer(SFTTrainer):
    def __init__(
        self, *args: Any, meter: TokenMeter, eval_collator: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.eval_collator = eval_collator
        # Checkpoints hold what resuming needs; the tokenizer is the base model's, unchanged.
        self.processing_class = None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        mode = "train" if model.training else "eval"
        real_tokens = inputs.pop("num_real_tokens")
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        targets = outputs.label_mask.sum()
        denominator = targets if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(denominator).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's targets and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        gathered = self.accelerator.gather_for_metrics(
            torch.stack([targets, outputs.is_top1.sum()]).reshape(1, 2)
        ).sum(0)
        n_targets, n_correct = int(gathered[0]), int(gathered[1])
        self._metrics[mode]["mean_token_accuracy"].append(n_correct / max(1, n_targets))
        if mode == "train":
            self.meter.add(real_tokens, targets)
        return (loss, outputs) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        # The validation examples live in their own arrays, so they need their own collator.
        train_collator = self.data_collator
        self.data_collator = self.eval_collator or train_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """No README.md next to the checkpoints: the parent uploads that folder as it is."""


def build_sft_trainer(
    spec: TrainingSpec,
    model: Any,
    tokenizer: Any,
    train: SFTExamples,
    valid: SFTExamples | None,
    *,
    args: dict[str, Any],
    world_size: int,
    meter: TokenMeter,
    callbacks: list[Any],
) -> tuple[PackedSFTTrainer, float]:
    """The trainer, and the number of examples per optimizer step."""
    from datasets import Dataset  # type: ignore[import-untyped]

    from workers.training.model import lora_config

    # batch_size counts examples per optimizer step, split over the processes.
    per_device = max(1, round(spec.batch_size / world_size))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = _collator(spec, train, pad_id)
    config = SFTConfig(
        **args,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        max_length=None,
        packing=False,  # the collator packs (packing.py); trl's packing would fill rows
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = PackedSFTTrainer(
        model=model,
        args=config,
        data_collator=collator,
        train_dataset=Dataset.from_dict({"index": list(range(len(train)))}),
        eval_dataset=None
        if valid is None
        else Dataset.from_dict({"index": list(range(len(valid)))}),
        processing_class=tokenizer,
        peft_config=lora_config(spec),
        callbacks=callbacks,
        meter=meter,
        eval_collator=None if valid is None else _collator(spec, valid, pad_id),
    )
    return trainer, float(per_device * world_size)


def _collator(spec: TrainingSpec, data: SFTExamples, pad_id: int) -> Any:
    return PackedCollator(data) if spec.packing else PaddedCollator(data, pad_id)

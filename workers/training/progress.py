"""Turns the trainer's progress into events, counts tokens and training time, and pauses on SIGUSR1.

Pause: SIGUSR1 only sets a flag, installed when the process starts (pause_signal.py); under the
multi-process launcher, the launcher creates a sentinel file named by ``LORAPLEX_PAUSE_FILE``.
After each optimizer step the flag is combined across processes (one tiny all-reduce), so every
process stops after the same step; the trainer then writes the checkpoint of that step, its event
goes out, and the run ends with ``paused``.

Training time, for tokens/s, is wall time minus logging, evaluation and checkpointing: each of
those callbacks marks when it ended, and a step's time runs from the latest mark to its
``on_step_end`` (so batch building counts, evaluation does not).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from workers.training import pause_signal
from workers.training.events import EventStream
from workers.training.launcher import PAUSE_FILE_ENV

STATE_FILE = "loraplex_state.json"


class PauseRequest:
    """Set by SIGUSR1 (or the launcher's sentinel file); read after each step."""

    def __init__(self) -> None:
        sentinel = os.environ.get(PAUSE_FILE_ENV)
        self._sentinel = Path(sentinel) if sentinel else None

    def install(self) -> None:
        """Make sure SIGUSR1 sets the flag (run.py did so already when it is the entry point)."""
        pause_signal.install()

    def requested_here(self) -> bool:
        return pause_signal.requested() or (self._sentinel is not None and self._sentinel.exists())

    def agreed(self) -> bool:
        """Whether any process was asked to pause (a collective call under DDP)."""
        local = self.requested_here()
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class TokenMeter:
    """Tokens this process trained on: ``real`` (non-pad inputs) and ``trained`` (loss targets)."""

    real: int = 0
    trained: int = 0

    def add(self, real: int | torch.Tensor, trained: int | torch.Tensor) -> None:
        self.real += int(real)
        self.trained += int(trained)


@dataclass
class RunTotals:
    """Job-wide totals, carried across resumes in each checkpoint's ``loraplex_state.json``."""

    real_tokens: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0
    last: dict[str, Any] = field(default_factory=dict)  # latest train/valid metrics

    @classmethod
    def load(cls, checkpoint: str | None) -> RunTotals:
        if checkpoint is None:
            return cls()
        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(
            real_tokens=int(data.get("real_tokens", 0)),
            trained_tokens=int(data.get("trained_tokens", 0)),
            train_seconds=float(data.get("train_seconds", 0.0)),
            last=dict(data.get("last", {})),
        )

    def save(self, checkpoint: str) -> None:
        state = {
            "real_tokens": self.real_tokens,
            "trained_tokens": self.trained_tokens,
            "train_seconds": self.train_seconds,
            "last": self.last,
        }
        (Path(checkpoint) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


class EventCallback(TrainerCallback):
    """Emits started/metrics/eval/checkpoint events and turns a pause request into a stop."""

    def __init__(
        self,
        events: EventStream,
        pause: PauseRequest,
        meter: TokenMeter,
        totals: RunTotals,
        *,
        runtime_info: dict[str, Any],
        resumed: bool,
    ) -> None:
        self.events = events
        self.pause = pause
        self.meter = meter
        self.totals = totals
        self.runtime_info = runtime_info
        self.resumed = resumed
        self.paused_at: int | None = None
        self.last_eval_step: int | None = None
        self._mark = time.perf_counter()
        self._pending_seconds = 0.0  # training time not yet moved into totals
        self._flushed = TokenMeter()  # this process's meter at the last flush
        self._window_real = 0  # since the last metrics event, all processes
        self._window_seconds = 0.0

    # -- timing: every non-training activity marks when it ended ---------------------------------
    def _touch(self) -> None:
        self._mark = time.perf_counter()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.events.emit(
            "started",
            total_steps=state.max_steps,
            resumed_from_step=state.global_step if self.resumed else None,
            **self.runtime_info,
        )
        self._touch()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._pending_seconds += time.perf_counter() - self._mark
        if state.global_step >= state.max_steps:
            # The last step is always reported; its checkpoint would be pointless (the adapter
            # is the output), so the one the default flow asks for is not written.
            control.should_log = True
            control.should_save = False
        elif self.pause.agreed():
            self.paused_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        if not control.should_log:
            # Steps logged less often than they end: the worker's stall watchdog still hears
            # from this process (at most every events.HEARTBEAT_SECONDS).
            self.events.heartbeat(step=state.global_step)
        self._touch()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self._emit_metrics(state, logs)
        elif "eval_loss" in logs:
            self.last_eval_step = state.global_step
            valid = {
                "valid_loss": logs["eval_loss"],
                "valid_mean_token_accuracy": logs.get("eval_mean_token_accuracy"),
            }
            self.totals.last.update(valid)
            self.events.emit("eval", step=state.global_step, **valid)
        self._touch()

    def _flush(self) -> None:
        """Move token counts and training time into the totals (collective under DDP)."""
        real, trained = _sum_over_processes(
            self.meter.real - self._flushed.real, self.meter.trained - self._flushed.trained
        )
        self._flushed = TokenMeter(self.meter.real, self.meter.trained)
        self.totals.real_tokens += real
        self.totals.trained_tokens += trained
        self.totals.train_seconds += self._pending_seconds
        self._window_real += real
        self._window_seconds += self._pending_seconds
        self._pending_seconds = 0.0

    def _emit_metrics(self, state: TrainerState, logs: dict[str, float]) -> None:
        self._flush()
        seconds, real = self._window_seconds, self._window_real
        self._window_seconds, self._window_real = 0.0, 0
        train = {
            "train_loss": logs["loss"],
            "train_mean_token_accuracy": logs.get("mean_token_accuracy"),
        }
        self.totals.last.update(train)
        self.events.emit(
            "metrics",
            step=state.global_step,
            **train,
            learning_rate=logs.get("learning_rate"),
            tokens_per_second=real / seconds if seconds > 0 else None,
            epoch=logs.get("epoch", state.epoch),
        )

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        # A long evaluation (a large validation file on slow hardware) is not a stall.
        self.events.heartbeat(step=state.global_step)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._touch()

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        # Every process has written its part (RNG state is per process) before the event goes out.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        self._flush()
        folder = str(Path(str(args.output_dir)) / f"checkpoint-{state.global_step}")
        if state.is_world_process_zero:
            self.totals.save(folder)
            self.events.emit(
                "checkpoint", step=state.global_step, path=folder, metrics=dict(self.totals.last)
            )
        self._touch()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._flush()


def _sum_over_processes(*values: int) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]

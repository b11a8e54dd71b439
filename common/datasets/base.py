"""The small value types shared by the validator, the API and the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DatasetFormat(StrEnum):
    CHAT = "chat"  # OpenAI chat JSONL: {"messages": [...]}
    DPO = "dpo"  # OpenAI preference JSONL: {"input", "preferred_output", ...}
    ALPACA = "alpaca"  # LLaMA-Factory: {"instruction", "input", "output", ...}
    SHAREGPT = "sharegpt"  # LLaMA-Factory: {"conversations": [{"from", "value"}]}


@dataclass(frozen=True)
class ValidationLimits:
    """Bounds that keep one upload from costing unbounded memory or time."""

    max_file_bytes: int = 512 * 1024 * 1024
    # Also the bound on one element of a JSON array: the example is what must fit.
    max_line_bytes: int = 1024 * 1024
    min_examples: int = 10
    max_examples: int = 1_000_000


@dataclass(frozen=True)
class DatasetSummary:
    format: DatasetFormat
    examples: int
    bytes: int


DEFAULT_LIMITS = ValidationLimits()

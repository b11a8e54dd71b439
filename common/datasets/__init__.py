"""Streaming validation of uploaded fine-tuning datasets, and their conversion for training.

Pure Python on purpose: the API process imports this and must never import torch.
"""

from common.datasets.base import DatasetFormat, DatasetSummary, ValidationLimits
from common.datasets.convert import parity_prompt, to_chat_messages, to_preference
from common.datasets.errors import DatasetError, ErrorCode
from common.datasets.validator import (
    StreamingValidator,
    iter_examples,
    validate_bytes_iter,
    validate_path,
)

__all__ = [
    "DatasetError",
    "DatasetFormat",
    "DatasetSummary",
    "ErrorCode",
    "StreamingValidator",
    "ValidationLimits",
    "iter_examples",
    "parity_prompt",
    "to_chat_messages",
    "to_preference",
    "validate_bytes_iter",
    "validate_path",
]

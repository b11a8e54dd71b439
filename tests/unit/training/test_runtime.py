"""Device, dtype, attention and thread choices for a spec on this machine."""

from __future__ import annotations

import pytest
import torch

from workers.training.errors import TrainingError
from workers.training.model import choose_runtime, cpu_has_native_bf16
from workers.training.spec import TrainingSpec

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choices")


def spec(**fields: object) -> TrainingSpec:
    base: dict[str, object] = {
        "method": "sft",
        "base_model_path": "/m",
        "base_model_name": "m",
        "train_data": "/d",
        "output_dir": "/o",
        "checkpoint_dir": "/c",
    }
    return TrainingSpec.from_dict({**base, **fields})


def test_auto_dtype_is_bf16_autocast_over_float32_weights_where_the_cpu_has_bf16() -> None:
    runtime = choose_runtime(spec())

    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert (runtime.device, runtime.dtype, runtime.weights_dtype) == (
        "cpu",
        expected,
        torch.float32,
    )
    assert choose_runtime(spec(dtype="float32")).dtype == torch.float32


def test_packed_sft_attends_per_example_and_the_rest_uses_sdpa() -> None:
    assert choose_runtime(spec()).attn == "sdpa_varlen"
    assert choose_runtime(spec(packing=False)).attn == "sdpa"
    assert choose_runtime(spec(method="dpo")).attn == "sdpa"


def test_threads_are_split_between_the_processes_of_a_machine() -> None:
    alone = choose_runtime(spec()).threads

    assert choose_runtime(spec(), local_world_size=2).threads == max(1, alone // 2)
    assert choose_runtime(spec(num_threads=3)).threads == 3


def test_quantization_needs_a_gpu() -> None:
    with pytest.raises(TrainingError, match="needs a CUDA GPU"):
        choose_runtime(spec(quantization="4bit"))

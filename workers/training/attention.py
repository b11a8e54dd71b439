"""``sdpa_varlen``: scaled-dot-product attention over packed, padding-free sequences.

FlashAttention-2 has a varlen kernel that attends within each packed example; SDPA (CPU, or CUDA
without flash-attn) has none. This attention function gives SDPA the same contract: with
``cu_seq_lens_q`` (the cumulative example lengths the packed collator sends with the batch,
which transformers hands to every attention call), it runs causal SDPA once per example, on views
of the packed query/key/value, so each example attends only to itself and the cost is the sum of
the examples' own causal attention. Without ``cu_seq_lens_q`` (a plain batch) it is ordinary SDPA.

No mask function is registered for it, so transformers builds no attention mask for this
implementation: the packed layout needs none, and a plain batch gets a causal SDPA (the padded
layout and DPO use the regular "sdpa" implementation instead).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "sdpa_varlen"

# The per-example loop keeps cuDNN out on CUDA: torch prefers cuDNN's SDPA on Hopper, and cuDNN
# builds an execution plan for every sequence length it has not seen, which the loop gives it
# once per example. On an H200 the packed recipe ran at 1.3k tokens/s with cuDNN, the padded one
# at 25k (docs/gpu_check.md, 2026-11-28). FlashAttention (GQA included) and the memory-efficient
# kernel need no plan; math is the fallback (float32 with GQA).
PER_EXAMPLE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_varlen(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query ``[B, H, T, D]``, key/value ``[B, KV, T, D]`` -> ``([B, T, H, D], None)``."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    gqa = query.shape[1] != key.shape[1]
    dropout_p = dropout if module.training else 0.0
    if cu_seq_lens is None:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout_p,
            is_causal=attention_mask is None and query.shape[2] > 1,
            scale=scaling,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("packed sequences come as one row; got a batch of several")
    bounds = [int(b) for b in cu_seq_lens.tolist()]
    backends = sdpa_kernel(PER_EXAMPLE_BACKENDS) if query.is_cuda else contextlib.nullcontext()
    with backends:
        parts = [
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                dropout_p=dropout_p,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for start, end in itertools.pairwise(bounds)
            if end > start
        ]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers; return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, sdpa_varlen)
    return NAME

"""Bias + exact (erf) GELU: y = gelu(x + bias), as RoBERTa's intermediate layer and MLM head use.

Reference: `bias_gelu_ref`. The fused Triton kernel is added beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x (..., N), bias (N,)
    return F.gelu(x + bias)

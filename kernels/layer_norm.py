"""Residual + dropout + LayerNorm: y = LayerNorm(dropout(x) + residual) over the last dim.

Reference: `layer_norm_ref`. The fused Triton kernel is added beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm_ref(
    x: torch.Tensor,  # (..., N)
    weight: torch.Tensor,  # (N,)
    bias: torch.Tensor,  # (N,)
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,  # (..., N)
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:  # (..., N)
    h = F.dropout(x, p=dropout_p, training=training) if dropout_p > 0.0 else x
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

"""Cross-entropy over the vocabulary, mean over non-ignored rows (0, not NaN, when all are ignored).

Reference: `cross_entropy_ref`. The fused Triton kernel is added beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_ref(
    logits: torch.Tensor,  # (N, V)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
) -> torch.Tensor:  # () fp32
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / n_valid

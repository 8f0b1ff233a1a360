"""Multi-head attention, non-causal, with a key padding mask and an optional document mask.

Reference: `attention_ref` (explicit softmax(QK^T * scale) V in PyTorch). The fused Triton kernel
(FlashAttention-2 style online softmax) is added beside it.
"""

from __future__ import annotations

import torch


def attention_ref(
    q: torch.Tensor,  # (B, S, H, D)
    k: torch.Tensor,  # (B, S, H, D)
    v: torch.Tensor,  # (B, S, H, D)
    key_padding_mask: torch.Tensor | None = None,  # (B, S) bool, True = real token
    softmax_scale: float | None = None,
    segment_ids: torch.Tensor | None = None,  # (B, S) int, attend only within equal ids
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, S, H, D)
    """softmax(Q K^T * scale + mask) V with masked scores at the dtype's minimum (as transformers
    does), so a query whose every key is masked yields a finite (uniform) row, never NaN."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    s_BHSS = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
    allowed = _allowed_BQK(key_padding_mask, segment_ids, q.shape[0], q.shape[1], q.device)
    if allowed is not None:
        s_BHSS = s_BHSS.masked_fill(~allowed[:, None], torch.finfo(s_BHSS.dtype).min)
    p_BHSS = torch.softmax(s_BHSS, dim=-1)
    if dropout_p > 0.0:
        p_BHSS = torch.nn.functional.dropout(p_BHSS, p=dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p_BHSS.to(v.dtype), v)


def _allowed_BQK(key_padding_mask, segment_ids, B, S, device):
    """(B, S_q, S_k) bool: which keys each query may attend to, or None for all."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.bool()[:, None, :].expand(B, S, S)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed

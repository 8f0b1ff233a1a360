"""Cross-entropy over the vocabulary for the masked rows, mean over non-ignored rows.

Algorithm: forward, one program per row streams the V logits in BLOCK_V chunks with an online
max/sum-exp (Milakov & Gimelshein 2018), so any vocabulary fits, and stores the row's logsumexp;
loss_i = lse_i - logit_i[label_i], 0 for ignored rows. Backward streams the row again and writes
dlogits = (softmax - onehot(label)) * dloss / n_valid. The mean divides by max(n_valid, 1): a batch
with no labelled row has loss 0, never NaN. Logits of any float dtype; math in fp32.
Reference: `cross_entropy_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._utils import check_dtype, check_runnable


@triton.jit
def _ce_fwd_kernel(
    Logits_ptr,  # (N, V)
    Labels_ptr,  # (N,) int64
    Loss_ptr,  # (N,) fp32
    LSE_ptr,  # (N,) fp32
    V,
    stride_row,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(Labels_ptr + row)
    base = Logits_ptr + row * stride_row
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = label != ignore_index
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(Loss_ptr + row, tl.where(valid, lse - target, 0.0))
    tl.store(LSE_ptr + row, lse)


@triton.jit
def _ce_bwd_kernel(
    Logits_ptr,  # (N, V)
    Labels_ptr,  # (N,)
    LSE_ptr,  # (N,)
    DLogits_ptr,  # (N, V)
    Scale_ptr,  # () fp32: dloss / n_valid
    V,
    stride_row,
    stride_drow,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(Labels_ptr + row)
    lse = tl.load(LSE_ptr + row)
    scale = tl.where(label != ignore_index, tl.load(Scale_ptr), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(Logits_ptr + row * stride_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(DLogits_ptr + row * stride_drow + cols, g.to(DLogits_ptr.dtype.element_ty), mask=cols < V)


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def cross_entropy_fwd(logits, labels, ignore_index):
    check_runnable("cross_entropy", logits, labels)
    check_dtype("cross_entropy", logits)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"kernels.cross_entropy: logits (N, V) and labels (N,) expected, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _ce_fwd_kernel[(N,)](
            logits, labels, loss, lse, V, logits.stride(0), ignore_index, BLOCK_V=_block_v(V), num_warps=8
        )
    return loss, lse, logits


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        loss_rows, lse, logits_c = cross_entropy_fwd(logits, labels.long(), ignore_index)
        n_valid = (labels != ignore_index).sum().clamp(min=1).float()
        ctx.save_for_backward(logits_c, labels, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, n_valid = ctx.saved_tensors
        N, V = logits.shape
        dlogits = torch.empty_like(logits)
        scale = (dloss.float() / n_valid).reshape(())
        if N:
            _ce_bwd_kernel[(N,)](
                logits,
                labels.long(),
                lse,
                dlogits,
                scale,
                V,
                logits.stride(0),
                dlogits.stride(0),
                ctx.ignore_index,
                BLOCK_V=_block_v(V),
                num_warps=8,
            )
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over rows whose label != ignore_index (0 when there are none).
    logits (N, V) any float dtype, labels (N,) int; returns a () fp32 tensor."""
    return _CrossEntropy.apply(logits, labels, ignore_index)


def cross_entropy_ref(
    logits: torch.Tensor,  # (N, V)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
) -> torch.Tensor:  # () fp32
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 in fp32; fp64 stays fp64
    total = F.cross_entropy(logits.to(acc), labels, ignore_index=ignore_index, reduction="sum")
    return total / n_valid

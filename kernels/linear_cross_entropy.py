"""Decoder projection fused with the masked-token cross-entropy: loss = CE(h @ W^T + b, labels).

Algorithm (after Liger-Kernel's fused_linear_cross_entropy): the N rows are processed in chunks of C;
for each chunk the (C, V) logits are formed by one GEMM, the cross-entropy kernels of
kernels/cross_entropy.py compute the rows' losses and overwrite the logits in place with
dlogits = (softmax - onehot) / n_valid, and the gradients are accumulated right away:
dh[chunk] = dlogits @ W, dW += dlogits^T @ h[chunk], db += colsum(dlogits). The backward only scales
them by dloss. So the (N, V) logits never exist at once: peak extra memory is one (C, V) chunk plus
an fp32 (V, D) dW, with C ~ N / ceil(V / D) so that a chunk is about as large as h itself.
Also returns the number of rows whose argmax is the label (masked-token accuracy) at no extra pass.
Limits: as cross_entropy; h/W/b share one float dtype; GEMMs run in that dtype with fp32 accumulation.
Reference: `linear_cross_entropy_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from kernels._utils import check_dtype, check_runnable
from kernels.cross_entropy import _block_v, _ce_bwd_kernel, _ce_fwd_kernel, cross_entropy_ref


def _chunk_rows(N: int, V: int, D: int) -> int:
    return max(1, min(N, triton.next_power_of_2(triton.cdiv(N, triton.cdiv(V, D)))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index):
        check_runnable("linear_cross_entropy", h, weight, bias, labels)
        check_dtype("linear_cross_entropy", h)
        N, D = h.shape
        V = weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])  # grad mode is always off inside forward itself
        labels = labels.long()
        n_valid = (labels != ignore_index).sum().clamp(min=1).float()
        scale = (1.0 / n_valid).reshape(())
        loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.int64, device=h.device)
        dh = torch.empty_like(h) if need_grad else None
        dw = torch.zeros(V, D, dtype=torch.float32, device=h.device) if need_grad else None
        db = torch.zeros(V, dtype=torch.float32, device=h.device) if need_grad else None
        C = _chunk_rows(N, V, D)
        for start in range(0, N, C):
            end = min(start + C, N)
            h_c, lab_c = h[start:end], labels[start:end]
            logits = torch.addmm(bias, h_c, weight.t())  # (C, V): the only logits alive
            correct += (logits.argmax(-1) == lab_c).sum()
            _ce_fwd_kernel[(end - start,)](
                logits,
                lab_c,
                loss_rows[start:end],
                lse[start:end],
                V,
                logits.stride(0),
                ignore_index,
                BLOCK_V=_block_v(V),
                num_warps=8,
            )
            if need_grad:
                _ce_bwd_kernel[(end - start,)](
                    logits,
                    lab_c,
                    lse[start:end],
                    logits,
                    scale,
                    V,
                    logits.stride(0),
                    logits.stride(0),
                    ignore_index,
                    BLOCK_V=_block_v(V),
                    num_warps=8,
                )
                dh[start:end] = logits @ weight
                dw.addmm_(logits.t().float(), h_c.float())
                db += logits.float().sum(0)
        ctx.mark_non_differentiable(correct)
        if need_grad:
            ctx.save_for_backward(dh, dw.to(weight.dtype), db.to(bias.dtype))
        return loss_rows.sum() / n_valid, correct

    @staticmethod
    def backward(ctx, dloss, _dcorrect):
        dh, dw, db = ctx.saved_tensors
        return dh * dloss.to(dh.dtype), dw * dloss.to(dw.dtype), db * dloss.to(db.dtype), None, None


def linear_cross_entropy(
    h: torch.Tensor,  # (N, D) hidden states of the masked tokens
    weight: torch.Tensor,  # (V, D) decoder (RoBERTa: the tied word embeddings)
    bias: torch.Tensor,  # (V,)
    labels: torch.Tensor,  # (N,) int
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:  # (() fp32 mean loss, () int64 rows predicted right)
    """Mean CE of h @ W^T + b over rows whose label != ignore_index (0 if none), without ever holding
    the (N, V) logits; also the count of rows whose argmax equals the label."""
    return _LinearCrossEntropy.apply(h, weight, bias, labels, ignore_index)


def linear_cross_entropy_ref(h, weight, bias, labels, ignore_index: int = -100):
    logits = F.linear(h, weight, bias)
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).sum()
    return cross_entropy_ref(logits, labels, ignore_index), correct

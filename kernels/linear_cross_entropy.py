"""Decoder projection fused with the masked-token cross-entropy: loss = CE(h @ W^T + b, labels).

Algorithm (after Liger-Kernel's fused_linear_cross_entropy; cuBLAS runs the GEMMs on tensor cores in
16 bits with fp32 accumulation): the N rows go in chunks of C, all at once up to MAX_CHUNK_LOGITS
logits (a base micro-batch's ~2.5K masked rows are one chunk). Per chunk:
  1. logits = h_c @ W^T             cuBLAS, into a (C, Vp) buffer whose row stride Vp = V rounded up to
                                    64 keeps every row 128-byte aligned (checkpoints keep the real V)
  2. `_ce_kernel` (cross_entropy)   adds the bias, writes loss / lse / argmax hit per row and overwrites
                                    the logits in place with g = (softmax - onehot) * s, 0 on ignored rows
  3. dh_c = g @ W                   cuBLAS
  4. dW (+)= g^T @ [h_c, 1, 0..]    cuBLAS; the ones column makes db = colsum(g) a by-product
The gradients are formed in the forward, so the logits die with it and the backward needs neither W
nor h (ZeRO-3 may have released W by then). dloss is only known in the backward: it multiplies dh,
dW, db by dloss / (n_valid * s) in fp32 on the device and casts (`_scale_cast_kernel`), so a loss scale
of 2^16 or 2^24 never passes through a 16-bit number. s = 1, except 2^15 for fp16 so that small
probabilities stay normal fp16 numbers in g; fp16 then keeps dh and dW in fp32 until that cast
(|g| <= 2^15 fits fp16, their sums over rows may not). dW is accumulated in fp32 only when there are
several chunks (or fp16); a single chunk writes it in the input dtype straight from cuBLAS.

Bytes moved, base micro-batch (N = 2458 masked rows, D = 768, V = 50265, Vp = 50304, bf16):
  before (chunks of 64 rows, 39 chunks): W read twice per chunk (39 x 154 MB), an fp32 dW
    read + written per chunk with an fp32 SIMT GEMM (39 x 309 MB), fp32 copies of each chunk
    (39 x 26 MB): ~19.5 GB and ~190 GFLOP off the tensor cores.
  after (one chunk): GEMM 1 reads W + h, writes logits (77 + 4 + 247 MB); _ce_kernel reads and writes
    them (495 MB); GEMM 3 reads g + W (247 + 77 MB); GEMM 4 reads g + h, writes dW (247 + 4 + 78 MB);
    the backward's cast reads and writes dW, dh (163 MB); glue < 10 MB: ~1.65 GB, 3 GEMMs of 190 GFLOP.
  full logits + F.cross_entropy on the same rows (cross_entropy_ref: fp32 log-softmax): ~5.5 GB.
Memory: one (C, Vp) 16-bit buffer plus dW; no (N, V) fp32 tensor ever exists.
Limits: as cross_entropy; h, W, b share one float dtype. Reference: `linear_cross_entropy_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._utils import check_dtype, check_runnable
from kernels.cross_entropy import ce_launch, check_labels, cross_entropy_ref

MAX_CHUNK_LOGITS = 2**27  # 256 MB of bf16 logits: one chunk up to ~2.6K rows at V = 50K
VOCAB_ALIGN = 64
_G_SCALE = {torch.float16: 2.0**15}  # s above; 1 for bf16/fp32 (fp32 exponent range)


@triton.jit
def _scale_cast_kernel(
    X_ptr,  # (M, N), row stride stride_x_row: a raw gradient (fp32 or 16-bit)
    Y_ptr,  # (M, N) contiguous, the gradient's dtype
    Scale_ptr,  # () fp32
    M,
    N,
    stride_x_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]  # rows x columns can pass 2^31
    x = tl.load(X_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(Scale_ptr)
    tl.store(Y_ptr + rows64 * N + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


def _scale_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, N) view with unit column stride -> contiguous (M, N) `dtype` of x * scale, math in fp32."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=dtype, device=x.device)
    block_n = min(triton.next_power_of_2(N), 1024)
    block_m = max(1, 4096 // block_n)
    if M and N:
        _scale_cast_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            x, y, scale, M, N, x.stride(0), BLOCK_M=block_m, BLOCK_N=block_n
        )
    return y


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, acc: torch.Tensor | None = None):
    """a @ b (+ acc) with fp32 accumulation, returned in out_dtype (fp32 from 16-bit inputs:
    cuBLAS's out_dtype GEMM; on CPU, for the interpreter tests, the same products in fp32)."""
    if out_dtype == a.dtype:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if a.device.type == "cpu":
        a, b = a.to(out_dtype), b.to(out_dtype)
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if acc is None:
        return torch.mm(a, b, out_dtype=out_dtype)
    return torch.addmm(acc, a, b, out_dtype=out_dtype, out=acc)


def _check(h, weight, bias, labels):
    check_runnable("linear_cross_entropy", h, weight, bias, labels)
    check_dtype("linear_cross_entropy", h)
    if h.ndim != 2 or weight.ndim != 2 or weight.shape[1] != h.shape[1] or labels.shape != h.shape[:1]:
        raise ValueError(
            f"kernels.linear_cross_entropy: h (N, D), weight (V, D), labels (N,) expected, got "
            f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"kernels.linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if any(t is not None and t.dtype != h.dtype for t in (weight, bias)):
        raise TypeError("kernels.linear_cross_entropy: h, weight and bias must share one dtype")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index, need_grad, chunk_rows):
        _check(h, weight, bias, labels)
        N, D = h.shape
        V, dev, dt = weight.shape[0], h.device, h.dtype
        h, weight, labels = h.contiguous(), weight.contiguous(), labels.long()
        Vp = triton.cdiv(V, VOCAB_ALIGN) * VOCAB_ALIGN
        C = max(1, min(N, chunk_rows or MAX_CHUNK_LOGITS // Vp))
        C = triton.cdiv(N, triton.cdiv(N, C)) if N else 1  # balanced chunks
        multi = C < N
        s = _G_SCALE.get(dt, 1.0)
        raw_dt = torch.float32 if (multi or dt == torch.float16) else dt
        grad_h, grad_w = need_grad and h.requires_grad, need_grad and weight.requires_grad
        grad_b = need_grad and bias is not None and bias.requires_grad
        if grad_b:  # [h, 1, 0..]: row stride a multiple of 8 elements for 16-byte-aligned GEMM rows
            h_x = F.pad(h, (0, triton.cdiv(D + 1, 8) * 8 - D))
            h_x[:, D] = 1.0
        else:
            h_x = h
        bias_p = None  # padding columns get logit 0 (zeroed below) + bias -inf: no masks in the loops
        if bias is not None or Vp > V:
            bias_p = F.pad(
                bias if bias is not None else weight.new_zeros(V), (0, Vp - V), value=float("-inf")
            )
        f32 = dict(dtype=torch.float32, device=dev)
        loss_rows, lse = torch.empty(N, **f32), torch.empty(N, **f32)
        hit = torch.empty(N, dtype=torch.int32, device=dev)
        ok = torch.ones((), dtype=torch.int32, device=dev)
        buf = torch.empty((min(C, N), Vp), dtype=dt, device=dev)
        buf[:, V:].zero_()  # the GEMM writes columns < V only; the gradient pass writes 0 here
        dh_parts = [torch.empty((0, D), dtype=raw_dt, device=dev)]
        dw_raw = None
        if (grad_w or grad_b) and (multi or not N):
            dw_raw = torch.zeros((V, h_x.shape[1]), dtype=raw_dt, device=dev)
        for start in range(0, N, C):
            end = min(start + C, N)
            logits = buf[: end - start, :V]
            torch.mm(h[start:end], weight.t(), out=logits)
            ce_launch(
                buf[: end - start], bias_p, labels[start:end], loss_rows[start:end], lse[start:end],
                hit[start:end], buf, None, ok, s, V, ignore_index, stats=True, grad=need_grad,
            )  # fmt: skip
            if grad_h:
                dh_parts.append(_mm(logits, weight, raw_dt))
            if grad_w or grad_b:
                dw_raw = _mm(logits.t(), h_x[start:end], raw_dt, acc=dw_raw)
        del buf
        check_labels(ok, labels, V, ignore_index, "linear_cross_entropy")
        n_valid = (labels != ignore_index).sum()
        correct = hit.sum()
        ctx.mark_non_differentiable(correct)
        if need_grad:
            dh_raw = torch.cat(dh_parts) if len(dh_parts) > 2 else dh_parts[-1]
            ctx.save_for_backward(dh_raw, dw_raw, n_valid)
            ctx.meta = (D, s, dt, grad_h, grad_w, grad_b)
        return loss_rows.sum() / n_valid.clamp(min=1), correct

    @staticmethod
    def backward(ctx, dloss, _dcorrect):
        dh_raw, dw_raw, n_valid = ctx.saved_tensors
        D, s, dt, grad_h, grad_w, grad_b = ctx.meta
        # fp32 throughout: dloss (a loss scale up to 2^24 and beyond) never becomes a 16-bit number
        scale = (dloss.float() / (n_valid.clamp(min=1) * s)).reshape(())
        dh = _scale_cast(dh_raw, scale, dt) if grad_h else None
        dw = _scale_cast(dw_raw[:, :D], scale, dt) if grad_w else None
        db = _scale_cast(dw_raw[:, D : D + 1], scale, dt).view(-1) if grad_b else None
        return dh, dw, db, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,  # (N, D) hidden states of the masked tokens
    weight: torch.Tensor,  # (V, D) decoder (RoBERTa: the tied word embeddings)
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int in [0, V) or ignore_index
    ignore_index: int = -100,
    chunk_rows: int | None = None,  # rows per chunk; None: as many as MAX_CHUNK_LOGITS allows
) -> tuple[torch.Tensor, torch.Tensor]:  # (() fp32 mean loss, () int64 labelled rows predicted right)
    """Mean CE of h @ W^T + b over rows whose label != ignore_index (0 if none), without the (N, V)
    logits ever existing in fp32 or beyond one chunk; also the count of labelled rows whose argmax
    equals the label. Other labels raise IndexError (CPU) or a device-side assert (CUDA)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    return _LinearCrossEntropy.apply(h, weight, bias, labels, ignore_index, need_grad, chunk_rows)


def linear_cross_entropy_ref(h, weight, bias, labels, ignore_index: int = -100):
    logits = F.linear(h, weight, bias)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & (labels != ignore_index)).sum()
    return cross_entropy_ref(logits, labels, ignore_index), correct

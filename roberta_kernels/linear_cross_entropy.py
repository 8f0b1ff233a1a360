"""Decoder projection fused with the masked-token cross-entropy: loss = CE(h @ W^T + b, labels).

Algorithm (after Liger-Kernel's fused_linear_cross_entropy; cuBLAS runs the GEMMs on tensor cores in
16 bits with fp32 accumulation): the N rows go in chunks of C, all at once up to MAX_CHUNK_LOGITS
logits (a base micro-batch's ~2.5K masked rows are one chunk). The vocabulary splits into its first
Va = V rounded down to 64 columns (50240) and a tail of V - Va < 64 (25), each with its contiguous
(C, Va) / (C, V - Va) buffer: rows of Va 16-bit logits stay 128-byte aligned (vector loads, TMA), and
cuBLASLt adds a bias in its epilogue only when the output is contiguous (torch's addmm copies the
bias into a strided output first: +2 x C x V x 2 bytes). Per chunk:
  1. logits = h_c @ W^T + b         torch.addmm, in the input dtype, per part: the bias in the
                                    epilogue, each logit rounded once from fp32
  2. `_ce_kernel` (cross_entropy)   writes loss / lse / argmax hit per row and overwrites the logits in
                                    place with g = (softmax - onehot) * s, 0 on ignored rows
  3. dh_c = g @ W                   cuBLAS: the tail's product, then the main one added to it
  4. dW (+)= g^T @ [h_c, 1, 0..]    cuBLAS, per part; the ones column makes db = colsum(g) a by-product
The logits are rounded as transformers' decoder (nn.Linear: addmm, cuBLASLt's bias epilogue) rounds
them, so each row's loss errs as that peer's does (bitwise on CPU; on CUDA up to the order of the
GEMMs' fp32 sums). GEMM 1 used to round h.W to 16 bits and the CE kernel to add the bias in fp32
afterwards: a row's error then was as large as the peer's but independent of it, so a row's loss
(and a mean over few rows) came out up to 27x further from fp64 than the peer's (issue 19).
The gradients are formed in the forward, so the logits die with it and the backward needs neither W
nor h (ZeRO-3 may have released W by then). dloss is only known in the backward: it multiplies dh,
dW, db by dloss / (n_valid * s) in fp32 on the device and casts (`_scale_cast_kernel`), so a loss scale
of 2^16 or 2^24 never passes through a 16-bit number. s = 1, except 2^15 for fp16 so that small
probabilities stay normal fp16 numbers in g; fp16 then keeps dh and dW in fp32 until that cast
(|g| <= 2^15 fits fp16, their sums over rows may not). dW is accumulated in fp32 only when there are
several chunks (or fp16); a single chunk writes it in the input dtype straight from cuBLAS.

Bytes moved, base micro-batch (N = 2458 masked rows, D = 768, V = 50265, bf16):
  before (chunks of 64 rows, 39 chunks): W read twice per chunk (39 x 154 MB), an fp32 dW
    read + written per chunk with an fp32 SIMT GEMM (39 x 309 MB), fp32 copies of each chunk
    (39 x 26 MB): ~19.5 GB and ~190 GFLOP off the tensor cores.
  after (one chunk): GEMM 1 reads W + h, writes logits (77 + 4 + 247 MB); _ce_kernel reads and writes
    them (495 MB); GEMM 3 reads g + W (247 + 77 MB); GEMM 4 reads g + h, writes dW (247 + 4 + 78 MB);
    the backward's cast reads and writes dW, dh (163 MB); the tail's three small GEMMs and the glue
    < 25 MB: ~1.65 GB, 3 GEMMs of 190 GFLOP (each as two: the aligned columns, the tail's).
  full logits + F.cross_entropy on the same rows (cross_entropy_ref: fp32 log-softmax): ~5.5 GB.
Memory: one (C, V) 16-bit buffer plus dW; no (N, V) fp32 tensor ever exists.
Limits: as cross_entropy; h, W, b share one float dtype. Reference: `linear_cross_entropy_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from roberta_kernels._utils import check_dtype, check_runnable
from roberta_kernels.cross_entropy import ce_launch, check_labels, cross_entropy_ref

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


def _mm(a, b, out_dtype: torch.dtype, out=None, accumulate: bool = False) -> torch.Tensor:
    """a @ b with fp32 accumulation, in out_dtype (fp32 from 16-bit inputs: cuBLAS's out_dtype GEMM;
    on CPU, for the interpreter tests, the same products in fp32): a new tensor, or into `out` (a
    contiguous view), or added to `out` (accumulate)."""
    if out_dtype != a.dtype and a.device.type == "cpu":
        a, b = a.to(out_dtype), b.to(out_dtype)
    kw = {} if out_dtype == a.dtype else {"out_dtype": out_dtype}
    if not accumulate:
        return torch.mm(a, b, out=out, **kw)
    return torch.addmm(out, a, b, out=out, **kw) if kw else out.addmm_(a, b)


def _decoder(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias) -> None:
    """out = h @ weight^T + bias in h's dtype, each element rounded once from fp32 (as nn.Linear).
    `out` contiguous: only then does torch's addmm put the bias in cuBLASLt's epilogue."""
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)


def _check(h, weight, bias, labels):
    check_runnable("linear_cross_entropy", h, weight, bias, labels)
    check_dtype("linear_cross_entropy", h)
    if h.ndim != 2 or weight.ndim != 2 or weight.shape[1] != h.shape[1] or labels.shape != h.shape[:1]:
        raise ValueError(
            f"roberta_kernels.linear_cross_entropy: h (N, D), weight (V, D), labels (N,) expected, got "
            f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"roberta_kernels.linear_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    if any(t is not None and t.dtype != h.dtype for t in (weight, bias)):
        raise TypeError("roberta_kernels.linear_cross_entropy: h, weight and bias must share one dtype")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index, need_grad, chunk_rows):
        _check(h, weight, bias, labels)
        N, D = h.shape
        V, dev, dt = weight.shape[0], h.device, h.dtype
        h, weight, labels = h.contiguous(), weight.contiguous(), labels.long()
        C = max(1, min(N, chunk_rows or MAX_CHUNK_LOGITS // V))
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
        Va = V // VOCAB_ALIGN * VOCAB_ALIGN or V  # V < 64: one part, nothing to align
        parts = [slice(0, Va)] + ([slice(Va, V)] if Va < V else [])  # (module docstring)
        if bias is not None:
            bias = bias.contiguous()
        f32 = dict(dtype=torch.float32, device=dev)
        loss_rows, lse = torch.empty(N, **f32), torch.empty(N, **f32)
        hit = torch.empty(N, dtype=torch.int32, device=dev)
        ok = torch.ones((), dtype=torch.int32, device=dev)
        rows = min(C, N)  # one allocation: the parts' contiguous (rows, width) buffers one after the other
        buf = torch.empty(rows * V, dtype=dt, device=dev)
        bufs = [buf[rows * p.start : rows * p.stop].view(rows, p.stop - p.start) for p in parts]
        dh_raw = torch.empty((N, D), dtype=raw_dt, device=dev) if grad_h else None
        dw_raw = None
        if grad_w or grad_b:
            dw_raw = (torch.zeros if not N else torch.empty)((V, h_x.shape[1]), dtype=raw_dt, device=dev)
        for start in range(0, N, C):
            end = min(start + C, N)
            logits = [b[: end - start] for b in bufs]
            for out, p in zip(logits, parts):
                _decoder(out, h[start:end], weight[p], bias[p] if bias is not None else None)
            tail = logits[1] if len(parts) > 1 else None
            ce_launch(
                logits[0], tail, labels[start:end], loss_rows[start:end], lse[start:end], hit[start:end],
                logits[0], None, ok, s, V, ignore_index, stats=True, grad=need_grad,
            )  # fmt: skip
            if grad_h:  # the tail's product first: a 16-bit dh then rounds the main sum once
                for i, (g, p) in enumerate(reversed(list(zip(logits, parts)))):
                    _mm(g, weight[p], raw_dt, out=dh_raw[start:end], accumulate=i > 0)
            if grad_w or grad_b:
                for g, p in zip(logits, parts):
                    _mm(g.t(), h_x[start:end], raw_dt, out=dw_raw[p], accumulate=start > 0)
        check_labels(ok, labels, V, ignore_index, "linear_cross_entropy")
        n_valid = (labels != ignore_index).sum()
        correct = hit.sum()
        ctx.mark_non_differentiable(correct)
        if need_grad:
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

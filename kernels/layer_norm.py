"""Residual + dropout + LayerNorm: y = LayerNorm(dropout(x) + residual) over the last dim.

Algorithm (after flash-attention's `ops/triton/layer_norm.py` and Liger-Kernel's layer_norm):
- forward: one program per row, the whole row in registers (BLOCK_N = next power of 2 >= N);
  h = x * keep / (1 - p) + residual with keep = philox(seed, row * N + col) >= p; writes y, h (the
  pre-norm sum, needed by the backward and by nothing else when neither residual nor dropout is
  used, in which case h is x itself) and per-row mean and rstd in fp32.
- backward: a persistent grid of G programs, each walking a contiguous run of rows, computing
  dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)) and accumulating dweight/dbias for its
  rows in fp32 registers; G partial rows are summed at the end. This avoids the (M, N) fp32
  dweight buffer and atomics, which is where off-the-shelf Triton LayerNorm backwards lose to torch
  at N = 768/1024. dx = dh * keep / (1 - p) regenerates the dropout mask from the seed.
Limits: N <= 16384 (one row per program in registers); fp32/fp16/bf16 with fp32 statistics.
Reference: `layer_norm_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._utils import check_dtype, check_runnable, new_seed, sm_count

MAX_N = 16384


@triton.jit
def _keep(seed, offs, p):
    return tl.rand(seed, offs) >= p


@triton.jit
def _ln_fwd_kernel(
    X_ptr,  # (M, N)
    R_ptr,  # (M, N) residual, or None
    W_ptr,
    B_ptr,  # (N,)
    Y_ptr,  # (M, N)
    H_ptr,  # (M, N) pre-norm sum, written when STORE_H
    Mean_ptr,
    Rstd_ptr,  # (M,) fp32
    N,
    stride_x_row,
    stride_r_row,
    eps,
    p,
    seed,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(X_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep(seed, (row * N + cols).to(tl.uint32), p)
        h = tl.where(keep, h / (1.0 - p), 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R_ptr + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_H:
        tl.store(H_ptr + row * N + cols, h.to(H_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(h, axis=0) / N
    d = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + row * N + cols, (d * rstd * w + b).to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Mean_ptr + row, mean)
    tl.store(Rstd_ptr + row, rstd)


@triton.jit
def _ln_bwd_kernel(
    DY_ptr,  # (M, N)
    H_ptr,  # (M, N) pre-norm sum
    W_ptr,  # (N,)
    Mean_ptr,
    Rstd_ptr,  # (M,)
    DH_ptr,  # (M, N) gradient of the residual (= of h)
    DX_ptr,  # (M, N) gradient of x (written when HAS_DROPOUT; else DH is dx)
    DW_ptr,
    DB_ptr,  # (G, N) fp32 partial sums, one row per program
    M,
    N,
    rows_per_program,
    p,
    seed,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: rows x N can pass 2^31
    for i in range(0, rows_per_program):
        row = row_start + i
        rmask = mask & ((tl.zeros_like(cols) + row) < M)  # the last program's run may pass the end
        offs = row * N + cols
        h = tl.load(H_ptr + offs, mask=rmask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + offs, mask=rmask, other=0.0).to(tl.float32)
        last = tl.minimum(row, M - 1)  # past the end: any valid row, its dy is masked to 0
        mean = tl.load(Mean_ptr + last)
        rstd = tl.load(Rstd_ptr + last)
        xhat = tl.where(rmask, (h - mean) * rstd, 0.0)
        wdy = w * dy
        dw += dy * xhat
        db += dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dh = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DH_ptr + offs, dh.to(DH_ptr.dtype.element_ty), mask=rmask)
        if HAS_DROPOUT:
            keep = _keep(seed, offs.to(tl.uint32), p)
            tl.store(
                DX_ptr + offs, tl.where(keep, dh / (1.0 - p), 0.0).to(DX_ptr.dtype.element_ty), mask=rmask
            )
    tl.store(DW_ptr + pid * N + cols, dw, mask=mask)
    tl.store(DB_ptr + pid * N + cols, db, mask=mask)


@triton.jit
def _dropout_keep_kernel(K_ptr, M, N, p, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(K_ptr + offs, _keep(seed, offs.to(tl.uint32), p).to(tl.int8), mask=offs < M * N)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_programs(M: int, device: torch.device) -> int:
    return min(M, 4 * sm_count(device))


def _warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def layer_norm_fwd(x, weight, bias, eps, residual, dropout_p, seed):
    check_runnable("layer_norm", x, weight, bias, residual)
    check_dtype("layer_norm", x)
    N = x.shape[-1]
    if N > MAX_N:
        raise ValueError(f"kernels.layer_norm: hidden size {N} > {MAX_N} is not supported")
    if weight.shape != (N,) or bias.shape != (N,):
        raise ValueError(
            f"kernels.layer_norm: weight/bias must be ({N},), got {tuple(weight.shape)}/{tuple(bias.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"kernels.layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        )
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else None
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    store_h = residual is not None or dropout_p > 0
    h = torch.empty((M, N), dtype=x.dtype, device=x.device) if store_h else x2
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    _ln_fwd_kernel[(M,)](
        x2,
        r2,
        weight,
        bias,
        y,
        h,
        mean,
        rstd,
        N,
        x2.stride(0),
        r2.stride(0) if r2 is not None else 0,
        eps,
        dropout_p,
        seed,
        HAS_RESIDUAL=r2 is not None,
        HAS_DROPOUT=dropout_p > 0,
        STORE_H=store_h,
        BLOCK_N=BLOCK_N,
        num_warps=_warps(BLOCK_N),
    )
    return y.view(x.shape), h, mean, rstd


def layer_norm_bwd(dy, h, weight, mean, rstd, dropout_p, seed, x_dtype, has_residual):
    N = h.shape[-1]
    M = h.shape[0]
    dy2 = _rows(dy).contiguous()
    dh = torch.empty((M, N), dtype=x_dtype, device=h.device)
    dx = torch.empty_like(dh) if dropout_p > 0 else dh
    G = max(_num_programs(M, h.device), 1)
    rows_per_program = triton.cdiv(M, G)
    dw = torch.empty((G, N), dtype=torch.float32, device=h.device)
    db = torch.empty((G, N), dtype=torch.float32, device=h.device)
    BLOCK_N = triton.next_power_of_2(N)
    _ln_bwd_kernel[(G,)](
        dy2,
        h,
        weight,
        mean,
        rstd,
        dh,
        dx,
        dw,
        db,
        M,
        N,
        rows_per_program,
        dropout_p,
        seed,
        HAS_DROPOUT=dropout_p > 0,
        BLOCK_N=BLOCK_N,
        num_warps=_warps(BLOCK_N),
    )
    return dx, (dh if has_residual else None), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, dropout_p, seed):
        y, h, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual, dropout_p, seed)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.dropout_p, ctx.seed, ctx.has_residual = dropout_p, seed, residual is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        h, weight, mean, rstd = ctx.saved_tensors
        dx, dres, dw, db = layer_norm_bwd(
            dy, h, weight, mean, rstd, ctx.dropout_p, ctx.seed, ctx.x_dtype, ctx.has_residual
        )
        dres = dres.view(ctx.x_shape) if dres is not None else None
        return dx.view(ctx.x_shape), dw, db, dres, None, None, None


def layer_norm(
    x: torch.Tensor,  # (..., N)
    weight: torch.Tensor,  # (N,)
    bias: torch.Tensor,  # (N,)
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,  # (..., N)
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:  # (..., N), x's dtype
    """LayerNorm(dropout(x) + residual) over the last dim; dropout is applied whenever
    dropout_p > 0 (the caller passes 0 in eval mode)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"kernels.layer_norm: dropout_p={dropout_p} must be in [0, 1)")
    seed = (new_seed() if dropout_seed is None else dropout_seed) if dropout_p > 0 else 0
    return _LayerNorm.apply(x, weight, bias, residual, eps, dropout_p, seed)


def layer_norm_dropout_keep(seed: int, M: int, N: int, p: float, device) -> torch.Tensor:
    """(M, N) bool: the dropout mask layer_norm draws for (seed, p) over M rows of N (for tests)."""
    keep = torch.empty((M, N), dtype=torch.int8, device=device)
    _dropout_keep_kernel[(triton.cdiv(M * N, 1024),)](keep, M, N, p, seed, BLOCK=1024)
    return keep.bool()


def layer_norm_ref(
    x: torch.Tensor,  # (..., N)
    weight: torch.Tensor,  # (N,)
    bias: torch.Tensor,  # (N,)
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,  # (..., N)
    dropout_p: float = 0.0,
    training: bool = True,
    keep: torch.Tensor | None = None,  # (..., N) bool: a given dropout mask instead of a fresh one
) -> torch.Tensor:  # (..., N)
    if keep is not None:
        h = x * keep / (1.0 - dropout_p)
    else:
        h = F.dropout(x, p=dropout_p, training=training) if dropout_p > 0.0 else x
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

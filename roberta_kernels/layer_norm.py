"""Residual + dropout + LayerNorm: y = LayerNorm(dropout(x) + residual) over the last dim.

Algorithm (after flash-attention's `ops/triton/layer_norm.py` and Liger-Kernel's layer_norm):
- forward: one program per two rows (w and b loaded once for both), whole rows in registers
  (BLOCK_N = next power of 2 >= N); h = x * keep / (1 - p) + residual; writes y, h (the pre-norm
  sum, needed by the backward and by nothing else when neither residual nor dropout is used, in
  which case h is x itself) and per-row mean and rstd in fp32.
- dropout (`_keep`): one Philox call (`tl.randint4x`) decides 4 columns, as FlashAttention-2
  amortises its draws: column 4q + k of row r is kept when 32-bit output k of Philox(seed,
  r * ceil(N / 4) + q) is >= p * 2^32 (31 bits compared). A pure function of (seed, row, column),
  so the backward regenerates the forward's mask and a resumed run draws the same masks.
  tl.rand per element ran a whole Philox per element and kept 1 of its 4 outputs.
- backward: a persistent grid of G programs, each walking a contiguous run of rows two at a time,
  the next pair's h and dy loaded before this pair's math (prefetch), computing
  dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)) and accumulating dweight/dbias for its
  rows in fp32 registers; G partial rows are summed at the end. This avoids the (M, N) fp32
  dweight buffer and atomics, which is where off-the-shelf Triton LayerNorm backwards lose to torch
  at N = 768/1024. dx = dh * keep / (1 - p) regenerates the dropout mask from the seed.
Limits: N <= 16384 (whole rows in registers); at N not a power of two (768) a quarter of the
Philox lanes (columns N..BLOCK_N) are computed and unused; fp32/fp16/bf16 with fp32 statistics.
Reference: `layer_norm_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from roberta_kernels._utils import check_dtype, check_runnable, new_seed, sm_count

MAX_N = 16384


@triton.jit
def _keep(seed, rows, n_quads, threshold, BLOCK_N: tl.constexpr):
    """(R, BLOCK_N) dropout keep mask of `rows` (R,): column 4q + k is kept when output k of the
    Philox call (seed, row * n_quads + q) is >= p * 2^32, so one call decides 4 columns."""
    q = tl.arange(0, BLOCK_N // 4)
    offs = (rows[:, None] * n_quads + q[None, :]).to(tl.uint32)
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_N))  # [.., 4q + k]
    return (r >> 1).to(tl.int32, bitcast=True) >= threshold  # threshold = p * 2^31


@triton.jit
def _kahan_add(total, comp, x):
    """total + x with the lost low-order bits carried in comp (Kahan 1965); returns (total, comp)."""
    y = x - comp
    t = total + y
    return t, (t - total) - y


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _ln_fwd_kernel(
    X_ptr,  # (M, N)
    R_ptr,  # (M, N) residual, or None
    W_ptr,
    B_ptr,  # (N,)
    Y_ptr,  # (M, N)
    H_ptr,  # (M, N) pre-norm sum, written when STORE_H
    Mean_ptr,
    Rstd_ptr,  # (M,) fp32
    M,
    N,
    stride_x_row,
    stride_r_row,
    eps,
    p,
    threshold,  # p * 2^31, the integer form of p that _keep compares with
    seed,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    h = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep(seed, rows, (N + 3) // 4, threshold, BLOCK_N)
        h = tl.where(keep, h * (1.0 / (1.0 - p)), 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R_ptr + rows[:, None] * stride_r_row + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    if STORE_H:
        tl.store(H_ptr + offs, h.to(H_ptr.dtype.element_ty), mask=mask)
    # Corrected two-pass mean (Chan, Golub & LeVeque 1983): the fp32 sum's rounding leaves mean0 off
    # by ~1 ulp, which a constant row's rstd (1/sqrt(eps) = 316) turned into y errors of 5e-4
    # (torch: 6e-8); adding the mean of the residuals h - mean0 makes a constant row's mean exact.
    mean0 = tl.sum(h, axis=1) / N
    mean = mean0 + tl.sum(tl.where(mask, h - mean0[:, None], 0.0), axis=1) / N
    # the variance over the centred row, still in registers (never E[h^2] - E[h]^2, which cancels)
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
    w = tl.load(W_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(Mean_ptr + rows, mean, mask=rmask)
    tl.store(Rstd_ptr + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
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
    threshold,
    seed,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Two rows an iteration, the next pair's loads issued before this pair's math (prefetch), so
    # each program keeps 2 x 2 rows of h and dy in flight instead of 1 x 2.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = (cols < N)[None, :]
    w = tl.load(W_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    # dweight/dbias: compensated (Kahan) sums. A program adds its rows one pair at a time (96 rows
    # at 1,536 rows on the interpreter's 4 "SMs", ~31 at 16K rows on 132), and the plain running sum
    # put dbias 1.26x over Liger's fp32 tolerance (atol = rtol = 1e-5) against fp64; Kahan: 0.37x.
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_c = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: rows x N can pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, M)
    rows = row_start + tl.arange(0, 2)
    mask = (rows < row_end)[:, None] & cmask
    offs = rows[:, None] * N + cols[None, :]
    h_next = tl.load(H_ptr + offs, mask=mask, other=0.0)
    dy_next = tl.load(DY_ptr + offs, mask=mask, other=0.0)
    for _ in range(0, rows_per_program, 2):
        rmask = rows < row_end
        h, dy, this_mask, this_offs = h_next.to(tl.float32), dy_next.to(tl.float32), mask, offs
        nxt = rows + 2
        mask = (nxt < row_end)[:, None] & cmask
        offs = nxt[:, None] * N + cols[None, :]
        h_next = tl.load(H_ptr + offs, mask=mask, other=0.0)
        dy_next = tl.load(DY_ptr + offs, mask=mask, other=0.0)
        mean = tl.load(Mean_ptr + rows, mask=rmask, other=0.0)[:, None]
        rstd = tl.load(Rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
        xhat = tl.where(this_mask, (h - mean) * rstd, 0.0)
        wdy = w * dy
        dw, dw_c = _kahan_add(dw, dw_c, tl.sum(dy * xhat, axis=0))
        db, db_c = _kahan_add(db, db_c, tl.sum(dy, axis=0))
        c1 = tl.sum(xhat * wdy, axis=1)[:, None] / N
        c2 = tl.sum(wdy, axis=1)[:, None] / N
        dh = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DH_ptr + this_offs, dh.to(DH_ptr.dtype.element_ty), mask=this_mask)
        if HAS_DROPOUT:
            keep = _keep(seed, rows, (N + 3) // 4, threshold, BLOCK_N)
            dx = tl.where(keep, dh * (1.0 / (1.0 - p)), 0.0)
            tl.store(DX_ptr + this_offs, dx.to(DX_ptr.dtype.element_ty), mask=this_mask)
        rows = nxt
    tl.store(DW_ptr + pid * N + cols, dw, mask=cols < N)
    tl.store(DB_ptr + pid * N + cols, db, mask=cols < N)


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _dropout_keep_kernel(K_ptr, M, N, threshold, seed, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    cols = tl.arange(0, BLOCK_N)
    keep = _keep(seed, rows, (N + 3) // 4, threshold, BLOCK_N)
    tl.store(K_ptr + rows[:, None] * N + cols[None, :], keep.to(tl.int8), mask=(cols < N)[None, :])


def _threshold(p: float) -> int:
    return int(p * 2**31)


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
        raise ValueError(f"roberta_kernels.layer_norm: hidden size {N} > {MAX_N} is not supported")
    if weight.shape != (N,) or bias.shape != (N,):
        raise ValueError(
            f"roberta_kernels.layer_norm: weight/bias must be ({N},), got {tuple(weight.shape)}/{tuple(bias.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"roberta_kernels.layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
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
    _ln_fwd_kernel[(triton.cdiv(M, 2),)](
        x2,
        r2,
        weight,
        bias,
        y,
        h,
        mean,
        rstd,
        M,
        N,
        x2.stride(0),
        r2.stride(0) if r2 is not None else 0,
        eps,
        dropout_p,
        _threshold(dropout_p),
        seed,
        HAS_RESIDUAL=r2 is not None,
        HAS_DROPOUT=dropout_p > 0,
        STORE_H=store_h,
        ROWS=2,
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
        _threshold(dropout_p),
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
        raise ValueError(f"roberta_kernels.layer_norm: dropout_p={dropout_p} must be in [0, 1)")
    seed = (new_seed() if dropout_seed is None else dropout_seed) if dropout_p > 0 else 0
    return _LayerNorm.apply(x, weight, bias, residual, eps, dropout_p, seed)


def layer_norm_dropout_keep(seed: int, M: int, N: int, p: float, device) -> torch.Tensor:
    """(M, N) bool: the dropout mask layer_norm draws for (seed, p) over M rows of N (for tests)."""
    keep = torch.empty((M, N), dtype=torch.int8, device=device)
    _dropout_keep_kernel[(M,)](keep, M, N, _threshold(p), seed, BLOCK_N=triton.next_power_of_2(N))
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

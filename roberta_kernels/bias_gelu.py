"""Bias + exact (erf) GELU: y = gelu(x + bias), as RoBERTa's intermediate layer and MLM head use.

Algorithm: one elementwise pass forward (read x, write y); backward recomputes h = x + b and writes
dx = dy * gelu'(h), with gelu'(h) = Phi(h) + h * phi(h), and sums dx over its rows in fp32 registers
as it goes (each program walks a run of rows of one column block), so dbias needs only a sum of
~4 x SMs / column-blocks partial rows, not a second read of the (M, N) dx. Memory-bound: 2 (fwd) /
3 (bwd) element passes.
Limits: last dim contiguous; fp32/fp16/bf16 with fp32 math. Reference: `bias_gelu_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from roberta_kernels._utils import check_dtype, check_runnable, sm_count


@triton.jit
def _bias_gelu_fwd_kernel(
    X_ptr,  # (M, N)
    B_ptr,  # (N,)
    Y_ptr,  # (M, N)
    M,
    N,
    stride_x_row,
    stride_y_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)  # rows x columns can pass 2^31
    x = tl.load(X_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    h = x + b[None, :]
    y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(Y_ptr + rows64[:, None] * stride_y_row + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY_ptr,  # (M, N)
    X_ptr,  # (M, N)
    B_ptr,  # (N,)
    DX_ptr,  # (M, N)
    DB_ptr,  # (G, N) fp32: per program row, the column sums of dx over its run of rows
    M,
    N,
    stride_x_row,
    rows_per_program,  # a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program walks a run of rows for one column block and sums dx in fp32 registers as it
    # goes: dbias comes with the pass that writes dx instead of a second read of the (M, N) dx.
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(B_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program  # rows x columns can pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, M)
    for i in range(0, rows_per_program, BLOCK_M):
        rows = row_start + i + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & (cols[None, :] < N)
        offs = rows[:, None] * stride_x_row + cols[None, :]
        x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = x + b[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        dx = dy * (cdf + h * pdf)
        tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dx, axis=0)
    tl.store(DB_ptr + pid_m * N + cols, db, mask=cols < N)


_BLOCK_M, _BLOCK_N = 16, 256  # 4K elements per program: enough bytes in flight, no register spills


def _grid(M, N):
    return (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    check_runnable("bias_gelu", x, bias)
    check_dtype("bias_gelu", x)
    N = x.shape[-1]
    if bias.shape != (N,):
        raise ValueError(f"roberta_kernels.bias_gelu: bias shape {tuple(bias.shape)} != ({N},)")
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    _bias_gelu_fwd_kernel[_grid(x2.shape[0], N)](
        x2, bias, y, x2.shape[0], N, x2.stride(0), y.stride(0), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N
    )
    return y.view(x.shape)


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    dy2 = dy.reshape(-1, N).contiguous()
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    col_blocks = triton.cdiv(N, _BLOCK_N)
    # about 4 programs per SM in all: runs of rows long enough that the (G, N) partials stay small
    G = max(1, min(triton.cdiv(M, _BLOCK_M), 4 * sm_count(x.device) // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(M, G), _BLOCK_M) * _BLOCK_M
    G = triton.cdiv(M, rows_per_program) if M else 1
    db = torch.zeros((G, N), dtype=torch.float32, device=x.device)
    if M:
        _bias_gelu_bwd_kernel[(G, col_blocks)](
            dy2, x2, bias, dx, db, M, N, x2.stride(0), rows_per_program, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N
        )
    return dx.view(x.shape), db.sum(0).to(bias.dtype)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return bias_gelu_fwd(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        return bias_gelu_bwd(dy, x, bias)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) with the exact erf GELU. x (..., N), bias (N,)."""
    return _BiasGelu.apply(x, bias)


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x (..., N), bias (N,)
    return F.gelu(x + bias)

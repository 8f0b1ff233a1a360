"""Multi-head attention, non-causal, with a key padding mask, an optional document mask and dropout.

Algorithm: FlashAttention-2 (Dao 2023, Algorithms 1 and 2). Forward: a program owns BLOCK_M queries
of one (batch, head), streams K/V in BLOCK_N blocks with an online softmax in base 2 (scores are
pre-multiplied by scale * log2(e) so exp2 is used), and stores O and the row log-sum-exp. Backward:
one kernel per K/V block accumulates dK and dV over all query blocks, another per query block
accumulates dQ over all key blocks (no atomics), with delta = rowsum(dO * O) precomputed.
Masks: a key is visible when key_padding_mask[b, key] is True and, when segment_ids are given,
segment_ids[b, query] == segment_ids[b, key] (packed documents do not see each other). A query
with no visible key gets a zero output and zero gradients (never NaN).
Dropout on the attention probabilities uses Philox (tl.rand) keyed by (seed, b*H+h, query, key),
so the backward regenerates the same mask; offsets wrap past 2^32 elements per seed.
Limits: head_dim in {16, 32, 64, 128}; q/k/v shaped (B, S, H, D) with the last dim contiguous (any
other strides, e.g. views of one packed QKV tensor); fp16/bf16 (fp32 accumulation) and fp32 (IEEE
dot products). Block sizes are fixed per head dim (see _config); no autotuning.
Reference: `attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_dtype, check_runnable, new_seed

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _keep(seed, bh, rows, cols, S, p):
    offs = (bh.to(tl.int64) * S + rows[:, None]) * S + cols[None, :]
    return tl.rand(seed, offs.to(tl.uint32)) >= p


@triton.jit
def _visible(
    KPM_ptr, SEG_ptr, b, rows, cols, S, stride_mb, stride_gb, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr
):
    """(BLOCK_M, BLOCK_N) bool: which keys each query may see."""
    vis = (cols < S)[None, :] & (rows >= 0)[:, None]
    if HAS_KPM:
        kpm = tl.load(KPM_ptr + b * stride_mb + cols, mask=cols < S, other=0)
        vis = vis & (kpm != 0)[None, :]
    if HAS_SEG:
        seg_q = tl.load(SEG_ptr + b * stride_gb + rows, mask=rows < S, other=-1)
        seg_k = tl.load(SEG_ptr + b * stride_gb + cols, mask=cols < S, other=-2)
        vis = vis & (seg_q[:, None] == seg_k[None, :])
    return vis


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in fp32; IEEE for fp32 inputs (Hopper's default tf32 would cost ~1e-3 accuracy)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _probs_and_dscores(
    q,
    k,
    v,
    do,
    lse,
    delta,
    vis,
    bh,
    rows,
    cols,
    S,
    qk_scale,
    p_drop,
    seed,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Backward recomputation for one (BLOCK_M, BLOCK_N) tile: P (dropped, for dV) and dS (for dQ, dK).
    P = exp2(S * scale * log2e - lse); dP = dO V^T (x dropout mask); dS = P * (dP - rowsum(dO * O))."""
    p = tl.where(vis, tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    if HAS_DROPOUT:
        z = tl.where(_keep(seed, bh, rows, cols, S, p_drop), 1.0 / (1.0 - p_drop), 0.0)
        return p * z, p * (dp * z - delta[:, None])
    else:
        return p, p * (dp - delta[:, None])


@triton.jit
def _attn_fwd_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided
    O_ptr,  # (B, S, H, D) contiguous
    LSE_ptr,  # (B, H, S) fp32, base-2 log-sum-exp of the scaled scores
    KPM_ptr,  # (B, S) int8, 1 = real token (or None)
    SEG_ptr,  # (B, S) int32 document ids (or None)
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_mb,
    stride_gb,
    H,
    S,
    qk_scale,
    p_drop,
    seed,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = Q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=rows[:, None] < S, other=0.0)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        vis = _visible(KPM_ptr, SEG_ptr, b, rows, cols, S, stride_mb, stride_gb, HAS_KPM, HAS_SEG)
        s = tl.where(vis, _dot(q, tl.trans(k), IEEE) * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, bh, rows, cols, S, p_drop), p / (1.0 - p_drop), 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O_ptr + ((b.to(tl.int64) * S + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, o.to(O_ptr.dtype.element_ty), mask=rows[:, None] < S)
    tl.store(LSE_ptr + bh.to(tl.int64) * S + rows, lse, mask=rows < S)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided
    DO_ptr,  # (B, S, H, D) contiguous
    LSE_ptr,
    Delta_ptr,  # (B, H, S) fp32
    DK_ptr,
    DV_ptr,  # (B, S, H, D) contiguous
    KPM_ptr,
    SEG_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_mb,
    stride_gb,
    H,
    S,
    qk_scale,
    sm_scale,
    p_drop,
    seed,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    q_base = Q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k = tl.load(
        K_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
        mask=cols[:, None] < S,
        other=0.0,
    )
    v = tl.load(
        V_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
        mask=cols[:, None] < S,
        other=0.0,
    )
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for start_m in range(0, S, BLOCK_M):
        rows = start_m + offs_m
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=rows[:, None] < S, other=0.0)
        do_ptrs = DO_ptr + ((b.to(tl.int64) * S + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
        do = tl.load(do_ptrs, mask=rows[:, None] < S, other=0.0)
        lse = tl.load(LSE_ptr + bh.to(tl.int64) * S + rows, mask=rows < S, other=float("inf"))
        delta = tl.load(Delta_ptr + bh.to(tl.int64) * S + rows, mask=rows < S, other=0.0)
        vis = _visible(KPM_ptr, SEG_ptr, b, rows, cols, S, stride_mb, stride_gb, HAS_KPM, HAS_SEG)
        pz, ds = _probs_and_dscores(
            q, k, v, do, lse, delta, vis, bh, rows, cols, S, qk_scale, p_drop, seed, HAS_DROPOUT, IEEE
        )
        dv += _dot(tl.trans(pz.to(do.dtype)), do, IEEE)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    out = ((b.to(tl.int64) * S + cols[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(DK_ptr + out, (dk * sm_scale).to(DK_ptr.dtype.element_ty), mask=cols[:, None] < S)
    tl.store(DV_ptr + out, dv.to(DV_ptr.dtype.element_ty), mask=cols[:, None] < S)


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided
    DO_ptr,  # (B, S, H, D) contiguous
    LSE_ptr,
    Delta_ptr,  # (B, H, S) fp32
    DQ_ptr,  # (B, S, H, D) contiguous
    KPM_ptr,
    SEG_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_mb,
    stride_gb,
    H,
    S,
    qk_scale,
    sm_scale,
    p_drop,
    seed,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(
        Q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
        mask=rows[:, None] < S,
        other=0.0,
    )
    io = ((b.to(tl.int64) * S + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    do = tl.load(DO_ptr + io, mask=rows[:, None] < S, other=0.0)
    lse = tl.load(LSE_ptr + bh.to(tl.int64) * S + rows, mask=rows < S, other=float("inf"))
    delta = tl.load(Delta_ptr + bh.to(tl.int64) * S + rows, mask=rows < S, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        vis = _visible(KPM_ptr, SEG_ptr, b, rows, cols, S, stride_mb, stride_gb, HAS_KPM, HAS_SEG)
        _, ds = _probs_and_dscores(
            q, k, v, do, lse, delta, vis, bh, rows, cols, S, qk_scale, p_drop, seed, HAS_DROPOUT, IEEE
        )
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ_ptr + io, (dq * sm_scale).to(DQ_ptr.dtype.element_ty), mask=rows[:, None] < S)


@triton.jit
def _attn_keep_kernel(K_ptr, S, p, seed, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    for start in range(0, S, BLOCK):
        c = start + cols
        keep = _keep(seed, bh, rows, c, S, p)
        ptrs = K_ptr + (bh.to(tl.int64) * S + rows[:, None]) * S + c[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < S) & (c[None, :] < S))


def _config(head_dim: int, backward: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Block sizes per head dim, chosen to fit sm_90's 227 KB of shared memory (checked in CI by
    compiling for sm_90) with 2-3 pipeline stages. Untuned: see kernels/bench.py."""
    if not backward:
        big = head_dim > 64 and dtype == torch.float32  # 3 fp32 stages of 128-wide tiles: 225 KB
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2 if big else 3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _prep(q, k, v, key_padding_mask, segment_ids):
    check_runnable("attention", q, k, v, key_padding_mask, segment_ids)
    check_dtype("attention", q)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"kernels.attention: q, k, v must share one (batch, seq, heads, head_dim) shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"kernels.attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    B, S, H, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"kernels.attention: head_dim {D} is not supported (supported: {HEAD_DIMS})")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise ValueError(
                f"kernels.attention: key_padding_mask must be (batch, seq) = {(B, S)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        kpm = key_padding_mask.to(torch.int8).contiguous()
    seg = None
    if segment_ids is not None:
        if segment_ids.shape != (B, S):
            raise ValueError(f"kernels.attention: segment_ids must be (batch, seq) = {(B, S)}")
        seg = segment_ids.to(torch.int32).contiguous()
    return q, k, v, kpm, seg


def _strides(q, k, v, kpm, seg):
    return (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        kpm.stride(0) if kpm is not None else 0,
        seg.stride(0) if seg is not None else 0,
    )


def attention_fwd(q, k, v, kpm, seg, sm_scale, p_drop, seed):
    B, S, H, D = q.shape
    o = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    cfg = _config(D, backward=False, dtype=q.dtype)
    grid = (triton.cdiv(S, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        kpm,
        seg,
        *_strides(q, k, v, kpm, seg),
        H,
        S,
        sm_scale * LOG2E,
        p_drop,
        seed,
        HAS_KPM=kpm is not None,
        HAS_SEG=seg is not None,
        HAS_DROPOUT=p_drop > 0,
        IEEE=q.dtype == torch.float32,
        HEAD_DIM=D,
        **cfg,
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, kpm, seg, sm_scale, p_drop, seed):
    B, S, H, D = q.shape
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # (B, H, S)
    dq, dk, dv = (torch.empty((B, S, H, D), dtype=q.dtype, device=q.device) for _ in range(3))
    cfg = _config(D, backward=True, dtype=q.dtype)
    common = dict(
        HAS_KPM=kpm is not None,
        HAS_SEG=seg is not None,
        HAS_DROPOUT=p_drop > 0,
        IEEE=q.dtype == torch.float32,
        HEAD_DIM=D,
        **cfg,
    )
    args = (*_strides(q, k, v, kpm, seg), H, S, sm_scale * LOG2E, sm_scale, p_drop, seed)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, kpm, seg, *args, **common
    )
    _attn_bwd_dq_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, kpm, seg, *args, **common
    )
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, segment_ids, sm_scale, p_drop, seed):
        q, k, v, kpm, seg = _prep(q, k, v, key_padding_mask, segment_ids)
        o, lse = attention_fwd(q, k, v, kpm, seg, sm_scale, p_drop, seed)
        ctx.save_for_backward(q, k, v, o, lse, kpm, seg)
        ctx.sm_scale, ctx.p_drop, ctx.seed = sm_scale, p_drop, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm, seg = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, kpm, seg, ctx.sm_scale, ctx.p_drop, ctx.seed)
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: torch.Tensor,  # (B, S, H, D)
    k: torch.Tensor,  # (B, S, H, D)
    v: torch.Tensor,  # (B, S, H, D)
    key_padding_mask: torch.Tensor | None = None,  # (B, S) bool, True = real token
    softmax_scale: float | None = None,
    segment_ids: torch.Tensor | None = None,  # (B, S) int, attend only within equal ids
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:  # (B, S, H, D), contiguous
    """softmax(Q K^T * scale + mask) V, FlashAttention-2 style; see the module docstring."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"kernels.attention: dropout_p={dropout_p} must be in [0, 1)")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    seed = (new_seed() if dropout_seed is None else dropout_seed) if dropout_p > 0 else 0
    return _Attention.apply(q, k, v, key_padding_mask, segment_ids, scale, dropout_p, seed)


def attention_dropout_keep(seed: int, B: int, H: int, S: int, p: float, device) -> torch.Tensor:
    """(B, H, S, S) bool: the dropout mask attention draws for (seed, p) (for tests)."""
    keep = torch.empty((B, H, S, S), dtype=torch.int8, device=device)
    _attn_keep_kernel[(triton.cdiv(S, 32), B * H)](keep, S, p, seed, BLOCK=32)
    return keep.bool()


def attention_ref(
    q: torch.Tensor,  # (B, S, H, D)
    k: torch.Tensor,  # (B, S, H, D)
    v: torch.Tensor,  # (B, S, H, D)
    key_padding_mask: torch.Tensor | None = None,  # (B, S) bool, True = real token
    softmax_scale: float | None = None,
    segment_ids: torch.Tensor | None = None,  # (B, S) int, attend only within equal ids
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,  # (B, H, S, S) bool: a given dropout mask instead of a fresh one
) -> torch.Tensor:  # (B, S, H, D)
    """softmax(Q K^T * scale + mask) V with masked scores at the dtype's minimum (as transformers
    does), so a query whose every key is masked yields a finite (uniform) row, never NaN."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 scores in fp32; fp64 stays fp64
    s_BHSS = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    allowed = _allowed_BQK(key_padding_mask, segment_ids, q.shape[0], q.shape[1])
    if allowed is not None:
        s_BHSS = s_BHSS.masked_fill(~allowed[:, None], torch.finfo(s_BHSS.dtype).min)
    p_BHSS = torch.softmax(s_BHSS, dim=-1)
    if keep is not None:
        p_BHSS = p_BHSS * keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p_BHSS = torch.nn.functional.dropout(p_BHSS, p=dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p_BHSS.to(v.dtype), v)


def _allowed_BQK(key_padding_mask, segment_ids, B, S):
    """(B, S_q, S_k) bool: which keys each query may attend to, or None for all."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.bool()[:, None, :].expand(B, S, S)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed

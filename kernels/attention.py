"""Multi-head attention, non-causal, with a key padding mask, an optional document mask and dropout.

Algorithm: FlashAttention-2 (Dao 2023, Algorithms 1 and 2), laid out as Triton's fused-attention
tutorial (06). Forward: a program owns BLOCK_M queries of one (batch, head), streams K/V in BLOCK_N
blocks with an online softmax in base 2 (scale * log2(e) and the running max folded into one FMA)
and stores O and the row log-sum-exp. Backward: the dQ kernel (one program per query block) also
computes delta = rowsum(dO * O) for its rows; then the dK/dV kernel (one program per key block)
works on S^T = K Q^T so that P^T and dS^T feed the tensor cores from registers (no transposes
through shared memory). No atomics: the backward is deterministic. dQ, dK and dV are written
straight into one (B, S, 3, H, D) gradient (`attention_qkvpacked`) or views of it.
Masks: a key is visible when key_padding_mask[b, key] is True and, when segment_ids are given,
segment_ids[b, query] == segment_ids[b, key]. No per-element mask work in the main loop: each
program first finds the key range it can see (a prologue over the (B, S) mask row); key blocks
wholly inside a run of real keys starting at a BLOCK_N boundary (right padding) go through an
unmasked loop, the rest (the tail, holes in the mask, documents) through a masked loop. With
segment_ids, key blocks outside [first, last] key of the query block's id interval are skipped
(packed documents: everything off the diagonal band). The dK/dV kernel needs no key mask at all
(a padded key's rows of dK/dV are zeroed at the end). A query with no visible key gets a zero
output and zero gradients (never NaN).
Dropout: one Philox-4x32 call (tl.philox, 10 rounds) per (query, 16 keys) gives 16 8-bit keep
decisions (FlashAttention-2's scheme), keyed by (seed, b*H + h, query, key // 16), so the backward
regenerates the mask and resume is exact. The rate applied is dropout_p rounded to a multiple of
1/256 (`attention_dropout_rate`), with the matching unbiased 1/(1 - rate) scale.
Limits: head_dim in {16, 32, 64, 128}; inputs shaped (B, S, H, D) (or (B, S, 3, H, D) packed) with
the last dim contiguous, any other strides; softmax_scale > 0; fp16/bf16 (fp32 accumulation) and
fp32 (IEEE dot products). Tiles are fixed per kernel and head dim (see _config); no autotuning.
Reference: `attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_dtype, check_runnable, new_seed

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
ROW_CHUNK = 256  # mask-row elements each step of the prologue that finds a program's key range


@triton.jit
def _keep_tile(seed, bh, rows, start_n, n_groups, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool dropout keep mask for queries `rows`, keys start_n + [0, BLOCK_N).

    One Philox call per (query, group of 16 keys): its four 32-bit words give 16 bytes, and key
    16 g + j is kept when its byte >= threshold. The join/reshape order fixes which byte is which
    key independently of the tile, so every kernel (any BLOCK_N multiple of 16) sees one mask."""
    groups = start_n // 16 + tl.arange(0, BLOCK_N // 16)
    c0 = (rows[:, None] * n_groups + groups[None, :]).to(tl.uint32)  # (BLOCK_M, BLOCK_N // 16)
    r0, r1, r2, r3 = tl.philox(seed, c0, bh, 0, 0)
    w = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N // 4))
    t = threshold.to(tl.uint32)
    k = tl.join(
        tl.join((w & 255) >= t, ((w >> 8) & 255) >= t), tl.join(((w >> 16) & 255) >= t, (w >> 24) >= t)
    )
    return tl.reshape(k, (BLOCK_M, BLOCK_N))


@triton.jit
def _key_range(
    KPM_ptr,
    SEG_ptr,
    b,
    seg_lo,
    seg_hi,
    S,
    stride_mb,
    stride_gb,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """(lo, hi_full, hi): keys [lo, hi) hold every key a program may see (real, and with a document
    id in [seg_lo, seg_hi] when HAS_SEG); BLOCK_N blocks in [lo, hi_full) are all visible (no mask)."""
    if HAS_KPM or HAS_SEG:
        first = S
        last = 0
        n_vis = 0
        for c in range(0, S, CHUNK):
            idx = c + tl.arange(0, CHUNK)
            ok = idx < S
            if HAS_KPM:
                ok &= tl.load(KPM_ptr + b * stride_mb + idx, mask=idx < S, other=0) != 0
            if HAS_SEG:
                g = tl.load(SEG_ptr + b * stride_gb + idx, mask=idx < S, other=0)
                ok &= (g >= seg_lo) & (g <= seg_hi)
            first = tl.minimum(first, tl.min(tl.where(ok, idx, S)))
            last = tl.maximum(last, tl.max(tl.where(ok, idx + 1, 0)))
            n_vis += tl.sum(ok.to(tl.int32))
        lo = first // BLOCK_N * BLOCK_N
        if HAS_SEG:
            hi_full = lo
        else:  # one run of real keys from a block boundary (right padding): unmasked up to its last full block
            run = (n_vis == last - first) & (first == lo)
            hi_full = tl.where(run, tl.maximum(last // BLOCK_N * BLOCK_N, lo), lo)
        return lo, hi_full, last
    else:
        return 0, S // BLOCK_N * BLOCK_N, S


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b in fp32; IEEE for fp32 inputs (Hopper's default tf32 would cost ~1e-3 accuracy)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
    seg_q,
    k_base,
    v_base,
    KPM_ptr,
    SEG_ptr,
    b,
    bh,
    rows,
    start_n,
    hi,
    S,
    stride_ks,
    stride_vs,
    stride_mb,
    stride_gb,
    qk_scale,
    n_groups,
    drop_threshold,
    seed,
    MASKED: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One key block of the online softmax; MASKED adds the key/document mask (boundary blocks)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    s = _dot(q, tl.trans(k), IEEE)  # (BLOCK_M, BLOCK_N) raw scores
    if MASKED:
        vis = (cols < hi)[None, :]
        if HAS_KPM:
            vis &= (tl.load(KPM_ptr + b * stride_mb + cols, mask=cols < S, other=0) != 0)[None, :]
        if HAS_SEG:
            seg_k = tl.load(SEG_ptr + b * stride_gb + cols, mask=cols < S, other=-1)
            vis &= seg_q[:, None] == seg_k[None, :]
        s = tl.where(vis, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_new = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])  # one FMA + MUFU per score
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_DROPOUT:  # l_i sums the undropped p; the 1/(1-p) scale is applied once at the end
        p = tl.where(_keep_tile(seed, bh, rows, start_n, n_groups, drop_threshold, BLOCK_M, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided, last dim contiguous
    O_ptr,  # (B, S, H, D) contiguous
    LSE_ptr,  # (B, H, S) fp32, base-2 log-sum-exp of the scaled scores (+inf: no visible key)
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
    drop_scale,
    drop_threshold,
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
    q_base = Q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=rows[:, None] < S, other=0.0)
    seg_q = rows  # unused without HAS_SEG
    seg_lo = 0
    seg_hi = 0
    if HAS_SEG:
        seg_q = tl.load(SEG_ptr + b * stride_gb + rows, mask=rows < S, other=-1)
        seg_lo = tl.min(tl.where(rows < S, seg_q, 2147483647))
        seg_hi = tl.max(tl.where(rows < S, seg_q, -2147483648))
    lo, hi_full, hi = _key_range(
        KPM_ptr, SEG_ptr, b, seg_lo, seg_hi, S, stride_mb, stride_gb, HAS_KPM, HAS_SEG, BLOCK_N, 256
    )
    n_groups = tl.cdiv(S, 16)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(lo, hi_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            seg_q,
            k_base,
            v_base,
            KPM_ptr,
            SEG_ptr,
            b,
            bh,
            rows,
            tl.multiple_of(start_n, BLOCK_N),
            hi,
            S,
            stride_ks,
            stride_vs,
            stride_mb,
            stride_gb,
            qk_scale,
            n_groups,
            drop_threshold,
            seed,
            False,
            HAS_KPM,
            HAS_SEG,
            HAS_DROPOUT,
            IEEE,
            BLOCK_M,
            BLOCK_N,
            HEAD_DIM,
        )
    for start_n in range(hi_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            seg_q,
            k_base,
            v_base,
            KPM_ptr,
            SEG_ptr,
            b,
            bh,
            rows,
            tl.multiple_of(start_n, BLOCK_N),
            hi,
            S,
            stride_ks,
            stride_vs,
            stride_mb,
            stride_gb,
            qk_scale,
            n_groups,
            drop_threshold,
            seed,
            True,
            HAS_KPM,
            HAS_SEG,
            HAS_DROPOUT,
            IEEE,
            BLOCK_M,
            BLOCK_N,
            HEAD_DIM,
        )
    empty = l_i == 0.0
    o = acc * tl.where(empty, 0.0, drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O_ptr + ((b.to(tl.int64) * S + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, o.to(O_ptr.dtype.element_ty), mask=rows[:, None] < S)
    tl.store(LSE_ptr + bh.to(tl.int64) * S + rows, lse, mask=rows < S)


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    seg_q,
    k_base,
    v_base,
    KPM_ptr,
    SEG_ptr,
    b,
    bh,
    rows,
    start_n,
    hi,
    S,
    stride_ks,
    stride_vs,
    stride_mb,
    stride_gb,
    qk_scale,
    drop_scale,
    n_groups,
    drop_threshold,
    seed,
    MASKED: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """dQ += dS K for one key block: P = exp2(S * scale*log2e - lse), dS = P * (dP * Z - delta)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
    if MASKED:
        vis = (cols < hi)[None, :]
        if HAS_KPM:
            vis &= (tl.load(KPM_ptr + b * stride_mb + cols, mask=cols < S, other=0) != 0)[None, :]
        if HAS_SEG:
            seg_k = tl.load(SEG_ptr + b * stride_gb + cols, mask=cols < S, other=-1)
            vis &= seg_q[:, None] == seg_k[None, :]
        p = tl.where(vis, p, 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    if HAS_DROPOUT:
        keep = _keep_tile(seed, bh, rows, start_n, n_groups, drop_threshold, BLOCK_M, BLOCK_N)
        ds = p * (tl.where(keep, dp, 0.0) * drop_scale - delta[:, None])
    else:
        ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided, last dim contiguous
    O_ptr,  # (B, S, H, D) contiguous
    DO_ptr,  # (B, S, H, D), strided, last dim contiguous
    LSE_ptr,  # (B, H, S) fp32
    Delta_ptr,  # (B, H, S) fp32, written here: rowsum(dO * O), read by the dK/dV kernel
    DQ_ptr,  # (B, S, H, D) strided (a view of the packed (B, S, 3, H, D) gradient)
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_gradb,
    stride_grads,
    stride_gradh,
    stride_mb,
    stride_gb,
    H,
    S,
    qk_scale,
    sm_scale,
    drop_scale,
    drop_threshold,
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
    k_base = K_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    in_q = rows[:, None] < S
    q = tl.load(
        Q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
        mask=in_q,
        other=0.0,
    )
    do = tl.load(
        DO_ptr + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
        mask=in_q,
        other=0.0,
    )
    o = tl.load(
        O_ptr + ((b.to(tl.int64) * S + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :],
        mask=in_q,
        other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(Delta_ptr + bh.to(tl.int64) * S + rows, delta, mask=rows < S)
    lse = tl.load(LSE_ptr + bh.to(tl.int64) * S + rows, mask=rows < S, other=float("inf"))
    seg_q = rows  # unused without HAS_SEG
    seg_lo = 0
    seg_hi = 0
    if HAS_SEG:
        seg_q = tl.load(SEG_ptr + b * stride_gb + rows, mask=rows < S, other=-1)
        seg_lo = tl.min(tl.where(rows < S, seg_q, 2147483647))
        seg_hi = tl.max(tl.where(rows < S, seg_q, -2147483648))
    lo, hi_full, hi = _key_range(
        KPM_ptr, SEG_ptr, b, seg_lo, seg_hi, S, stride_mb, stride_gb, HAS_KPM, HAS_SEG, BLOCK_N, 256
    )
    n_groups = tl.cdiv(S, 16)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(lo, hi_full, BLOCK_N):
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            seg_q,
            k_base,
            v_base,
            KPM_ptr,
            SEG_ptr,
            b,
            bh,
            rows,
            tl.multiple_of(start_n, BLOCK_N),
            hi,
            S,
            stride_ks,
            stride_vs,
            stride_mb,
            stride_gb,
            qk_scale,
            drop_scale,
            n_groups,
            drop_threshold,
            seed,
            False,
            HAS_KPM,
            HAS_SEG,
            HAS_DROPOUT,
            IEEE,
            BLOCK_M,
            BLOCK_N,
            HEAD_DIM,
        )
    for start_n in range(hi_full, hi, BLOCK_N):
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            seg_q,
            k_base,
            v_base,
            KPM_ptr,
            SEG_ptr,
            b,
            bh,
            rows,
            tl.multiple_of(start_n, BLOCK_N),
            hi,
            S,
            stride_ks,
            stride_vs,
            stride_mb,
            stride_gb,
            qk_scale,
            drop_scale,
            n_groups,
            drop_threshold,
            seed,
            True,
            HAS_KPM,
            HAS_SEG,
            HAS_DROPOUT,
            IEEE,
            BLOCK_M,
            BLOCK_N,
            HEAD_DIM,
        )
    dq_ptrs = (
        DQ_ptr
        + b.to(tl.int64) * stride_gradb
        + h * stride_gradh
        + rows[:, None] * stride_grads
        + offs_d[None, :]
    )
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ_ptr.dtype.element_ty), mask=in_q)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    seg_k,
    q_base,
    do_base,
    LSE_ptr,
    Delta_ptr,
    SEG_ptr,
    b,
    bh,
    pid_n,
    start_m,
    S,
    stride_qs,
    stride_dos,
    stride_gb,
    qk_scale,
    drop_scale,
    n_groups,
    drop_threshold,
    seed,
    MASKED: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """dK += dS^T Q, dV += (P Z)^T dO for one query block, on S^T = K Q^T (BLOCK_N, BLOCK_M) tiles;
    MASKED: the last query block, past S (rows out of range get lse = +inf, so P = 0)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    lse_ptrs = LSE_ptr + bh.to(tl.int64) * S + rows
    delta_ptrs = Delta_ptr + bh.to(tl.int64) * S + rows
    if MASKED:
        in_q = rows < S
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=in_q[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=in_q[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=in_q, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=in_q, other=0.0)
    else:
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :])
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :])
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    p_t = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if HAS_SEG:
        seg_q = tl.load(SEG_ptr + b * stride_gb + rows, mask=rows < S, other=-2)
        p_t = tl.where(seg_k[:, None] == seg_q[None, :], p_t, 0.0)
    dp_t = _dot(v, tl.trans(do), IEEE)
    if HAS_DROPOUT:
        keep = _keep_tile(seed, bh, rows, pid_n * BLOCK_N, n_groups, drop_threshold, BLOCK_M, BLOCK_N)
        keep_t = tl.trans(keep)
        dv += _dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, IEEE)
        ds_t = p_t * (tl.where(keep_t, dp_t, 0.0) * drop_scale - delta[None, :])
    else:
        dv += _dot(p_t.to(do.dtype), do, IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided, last dim contiguous
    DO_ptr,  # (B, S, H, D), strided, last dim contiguous
    LSE_ptr,
    Delta_ptr,  # (B, H, S) fp32
    DK_ptr,
    DV_ptr,  # (B, S, H, D) strided (views of the packed (B, S, 3, H, D) gradient)
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_gradb,
    stride_grads,
    stride_gradh,
    stride_mb,
    stride_gb,
    H,
    S,
    qk_scale,
    sm_scale,
    drop_scale,
    drop_threshold,
    seed,
    HAS_KPM: tl.constexpr,
    HAS_SEG: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One key block against all query blocks, in the S^T = K Q^T orientation (BLOCK_N, BLOCK_M).
    Padded keys need no mask here: their dK/dV rows are zeroed at the end and no other row reads them."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = cols < S
    k = tl.load(
        K_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
        mask=in_k[:, None],
        other=0.0,
    )
    v = tl.load(
        V_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
        mask=in_k[:, None],
        other=0.0,
    )
    q_base = Q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    do_base = DO_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
    real_k = in_k
    if HAS_KPM:
        real_k &= tl.load(KPM_ptr + b * stride_mb + cols, mask=in_k, other=0) != 0
    seg_k = cols  # unused without HAS_SEG
    if HAS_SEG:
        seg_k = tl.load(SEG_ptr + b * stride_gb + cols, mask=in_k, other=-1)
        # queries whose document id lies in the real keys' id interval (no KPM: ids need no padding check)
        lo, _, hi = _key_range(
            KPM_ptr,
            SEG_ptr,
            b,
            tl.min(tl.where(real_k, seg_k, 2147483647)),
            tl.max(tl.where(real_k, seg_k, -2147483648)),
            S,
            stride_mb,
            stride_gb,
            False,
            True,
            BLOCK_M,
            256,
        )
    else:
        lo = 0
        hi = tl.where(tl.max(real_k.to(tl.int32)) > 0, S, 0)  # a block of padding only: nothing to do
    n_groups = tl.cdiv(S, 16)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    hi_full = tl.maximum(lo, tl.minimum(hi, S // BLOCK_M * BLOCK_M))  # whole query blocks: unmasked loads
    for start_m in range(lo, hi_full, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, seg_k, q_base, do_base, LSE_ptr, Delta_ptr, SEG_ptr, b, bh, pid_n,
            tl.multiple_of(start_m, BLOCK_M), S, stride_qs, stride_dos, stride_gb, qk_scale, drop_scale,
            n_groups, drop_threshold, seed,
            False, HAS_SEG, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N, HEAD_DIM,
        )  # fmt: skip
    for start_m in range(hi_full, hi, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, seg_k, q_base, do_base, LSE_ptr, Delta_ptr, SEG_ptr, b, bh, pid_n,
            tl.multiple_of(start_m, BLOCK_M), S, stride_qs, stride_dos, stride_gb, qk_scale, drop_scale,
            n_groups, drop_threshold, seed,
            True, HAS_SEG, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N, HEAD_DIM,
        )  # fmt: skip
    out = b.to(tl.int64) * stride_gradb + h * stride_gradh + cols[:, None] * stride_grads + offs_d[None, :]
    keep_row = real_k[:, None]
    tl.store(
        DK_ptr + out, tl.where(keep_row, dk * sm_scale, 0.0).to(DK_ptr.dtype.element_ty), mask=in_k[:, None]
    )
    tl.store(
        DV_ptr + out, tl.where(keep_row, dv * drop_scale, 0.0).to(DV_ptr.dtype.element_ty), mask=in_k[:, None]
    )


@triton.jit
def _attn_keep_kernel(Keep_ptr, S, threshold, seed, BLOCK: tl.constexpr):
    """(B*H, S, S) int8: the dropout keep mask the attention kernels draw (for tests)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    n_groups = tl.cdiv(S, 16)
    for start in range(0, S, BLOCK):
        keep = _keep_tile(seed, bh, rows, start, n_groups, threshold, BLOCK, BLOCK)
        ptrs = Keep_ptr + (bh.to(tl.int64) * S + rows[:, None]) * S + start + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < S) & (start + cols[None, :] < S))


def _config(kernel: str, head_dim: int, dropout: bool) -> dict:
    """Tiles per kernel ('fwd', 'dq', 'dkdv'), picked from sm_90 compiles (registers, spills, main-loop
    SASS per tile; see kernels.compile_check) to fit 227 KB of shared memory, fp32 included. BLOCK_M
    counts queries, BLOCK_N keys. Untimed on a GPU yet: see kernels/bench.py."""
    wide = head_dim > 64
    if kernel == "fwd":  # 8 warps on 128x128: 472 SASS per 128x64 of scores vs 521 + spills on 4 warps
        return dict(BLOCK_M=128, BLOCK_N=64 if wide else 128, num_warps=8, num_stages=2)
    if kernel == "dq":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2)
    # dkdv: 64x128 spills a few registers with dropout (255 used); 32x128 does not
    return dict(BLOCK_M=32 if dropout else 64, BLOCK_N=64 if wide else 128, num_warps=8, num_stages=2)


def attention_dropout_rate(p: float) -> float:
    """The dropout rate the kernels apply for a requested `p`: 8-bit keep decisions round it to a
    multiple of 1/256 (0.1 -> 26/256 = 0.1016); kept probabilities are scaled by 1/(1 - rate)."""
    return min(round(p * 256), 255) / 256


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


def _strides(*tensors):
    """(batch, seq, head) strides of each (B, S, H, D) tensor, then the (B, S) masks' batch strides."""
    *bshd, kpm, seg = tensors
    return (
        *(s for t in bshd for s in t.stride()[:3]),
        kpm.stride(0) if kpm is not None else 0,
        seg.stride(0) if seg is not None else 0,
    )


def _flags(q, kpm, seg, p_drop, cfg):
    return dict(
        HAS_KPM=kpm is not None,
        HAS_SEG=seg is not None,
        HAS_DROPOUT=p_drop > 0,
        IEEE=q.dtype == torch.float32,
        HEAD_DIM=q.shape[-1],
        **cfg,
    )


def attention_fwd(q, k, v, kpm, seg, sm_scale, p_drop, seed):
    """(B, S, H, D) q, k, v (last dim contiguous) -> o (B, S, H, D) contiguous, lse (B, H, S) fp32."""
    B, S, H, D = q.shape
    o = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    cfg = _config("fwd", D, p_drop > 0)
    _attn_fwd_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * H)](
        q, k, v, o, lse, kpm, seg,
        *_strides(q, k, v, kpm, seg),
        H, S, sm_scale * LOG2E, 1.0 / (1.0 - p_drop), round(p_drop * 256), seed,
        **_flags(q, kpm, seg, p_drop, cfg),
    )  # fmt: skip
    return o, lse


def attention_bwd(do, q, k, v, o, lse, kpm, seg, sm_scale, p_drop, seed):
    """Gradients of attention_fwd: one (B, S, 3, H, D) tensor holding dq, dk, dv."""
    B, S, H, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    dqkv = torch.empty((B, S, 3, H, D), dtype=q.dtype, device=q.device)
    dq, dk, dv = dqkv.unbind(2)
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)  # written by the dQ kernel
    args = (
        *_strides(q, k, v, do, dq, kpm, seg),
        H, S, sm_scale * LOG2E, sm_scale, 1.0 / (1.0 - p_drop), round(p_drop * 256), seed,
    )  # fmt: skip
    cfg = _config("dq", D, p_drop > 0)
    _attn_bwd_dq_kernel[(triton.cdiv(S, cfg["BLOCK_M"]), B * H)](
        q, k, v, o, do, lse, delta, dq, kpm, seg, *args, **_flags(q, kpm, seg, p_drop, cfg)
    )
    cfg = _config("dkdv", D, p_drop > 0)
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, kpm, seg, *args, **_flags(q, kpm, seg, p_drop, cfg)
    )
    return dqkv


class _Attention(torch.autograd.Function):
    """Inputs either (q, k, v) or (qkv, None, None) with qkv packed (B, S, 3, H, D); the gradient
    comes back in the same form, written by the kernels into one (B, S, 3, H, D) buffer."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, segment_ids, sm_scale, p_drop, seed):
        ctx.packed = k is None
        if ctx.packed:
            q, k, v = q.unbind(2)
        q, k, v, kpm, seg = _prep(q, k, v, key_padding_mask, segment_ids)
        o, lse = attention_fwd(q, k, v, kpm, seg, sm_scale, p_drop, seed)
        ctx.save_for_backward(q, k, v, o, lse, kpm, seg)
        ctx.sm_scale, ctx.p_drop, ctx.seed = sm_scale, p_drop, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm, seg = ctx.saved_tensors
        dqkv = attention_bwd(do, q, k, v, o, lse, kpm, seg, ctx.sm_scale, ctx.p_drop, ctx.seed)
        grads = (dqkv, None, None) if ctx.packed else dqkv.unbind(2)
        return *grads, None, None, None, None, None


def _apply(q, k, v, key_padding_mask, softmax_scale, segment_ids, dropout_p, dropout_seed, head_dim):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"kernels.attention: dropout_p={dropout_p} must be in [0, 1)")
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    if scale <= 0:
        raise ValueError(f"kernels.attention: softmax_scale={scale} must be > 0")
    p = attention_dropout_rate(dropout_p)
    seed = (new_seed() if dropout_seed is None else dropout_seed) if p > 0 else 0
    return _Attention.apply(q, k, v, key_padding_mask, segment_ids, scale, p, seed)


def attention(
    q: torch.Tensor,  # (B, S, H, D)
    k: torch.Tensor,  # (B, S, H, D)
    v: torch.Tensor,  # (B, S, H, D)
    key_padding_mask: torch.Tensor | None = None,  # (B, S) bool, True = real token
    softmax_scale: float | None = None,
    segment_ids: torch.Tensor | None = None,  # (B, S) int, attend only within equal ids
    dropout_p: float = 0.0,  # applied as attention_dropout_rate(dropout_p)
    dropout_seed: int | None = None,
) -> torch.Tensor:  # (B, S, H, D), contiguous
    """softmax(Q K^T * scale + mask) V, FlashAttention-2 style; see the module docstring. When q, k, v
    are views of one packed projection, `attention_qkvpacked` saves the backward a stack."""
    return _apply(q, k, v, key_padding_mask, softmax_scale, segment_ids, dropout_p, dropout_seed, q.shape[-1])


def attention_qkvpacked(
    qkv: torch.Tensor,  # (B, S, 3, H, D), last dim contiguous (e.g. a (B, S, 3*H*D) projection viewed)
    key_padding_mask: torch.Tensor | None = None,  # (B, S) bool, True = real token
    softmax_scale: float | None = None,
    segment_ids: torch.Tensor | None = None,  # (B, S) int, attend only within equal ids
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> torch.Tensor:  # (B, S, H, D), contiguous
    """attention(*qkv.unbind(2), ...) whose gradient the kernels write straight into one
    (B, S, 3, H, D) tensor (no unbind-backward stack)."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"kernels.attention_qkvpacked: qkv must be (B, S, 3, H, D), got {tuple(qkv.shape)}")
    return _apply(
        qkv, None, None, key_padding_mask, softmax_scale, segment_ids, dropout_p, dropout_seed, qkv.shape[-1]
    )


def attention_dropout_keep(seed: int, B: int, H: int, S: int, p: float, device) -> torch.Tensor:
    """(B, H, S, S) bool: the dropout keep mask attention draws for (seed, p) (for tests); it drops
    at rate attention_dropout_rate(p)."""
    keep = torch.empty((B, H, S, S), dtype=torch.int8, device=device)
    _attn_keep_kernel[(triton.cdiv(S, 32), B * H)](
        keep, S, round(attention_dropout_rate(p) * 256), seed, BLOCK=32
    )
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


def attention_qkvpacked_ref(
    qkv: torch.Tensor,  # (B, S, 3, H, D)
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # (B, S, H, D)
    """attention_ref on a packed (B, S, 3, H, D) projection: the reference of attention_qkvpacked."""
    return attention_ref(*qkv.unbind(2), key_padding_mask, softmax_scale, segment_ids, dropout_p)


def _allowed_BQK(key_padding_mask, segment_ids, B, S):
    """(B, S_q, S_k) bool: which keys each query may attend to, or None for all."""
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.bool()[:, None, :].expand(B, S, S)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = same if allowed is None else allowed & same
    return allowed

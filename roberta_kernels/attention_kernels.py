"""The @triton.jit kernels of roberta_kernels.attention (launchers, autograd, reference: roberta_kernels/attention.py).

Algorithm: FlashAttention-2 (Dao 2023, Algorithms 1 and 2), laid out as Triton's fused-attention
tutorial (06). Forward: a program owns BLOCK_M queries of one (batch, head), streams K/V in BLOCK_N
blocks with an online softmax in base 2 (scale * log2(e) and the running max folded into one FMA)
and stores O and the row log-sum-exp. Backward: the dQ kernel (one program per query block) also
computes delta = rowsum(dO * O) for its rows; then the dK/dV kernel (one program per key block)
works on S^T = K Q^T so that P^T and dS^T feed the tensor cores from registers (no transposes
through shared memory). No atomics: the backward is deterministic. dQ, dK and dV are written
straight into one (B, S, 3, H, D) gradient (`attention_qkvpacked`) or views of it.
fp32 (IEEE) backward: delta = rowsum(dO * O) and the dots' dP round differently, so in a row with one
visible key (P = 1) dS = P (dP - delta) is a rounding remainder, not 0, and S queries add it into
that key's dK (8-15x torch's error at S = 200). The dQ loop therefore also sums R = rowsum(P * dP)
from its own P and dP (as torch's softmax backward forms sum(p * dp)) and P K (a tf32 dot: delta - R
is ~1e-7 of dP), corrects dQ by (delta - R) P K, and hands R to the dK/dV kernel, whose dots give bitwise the same P and dP (IEEE
dots sum over the head dim in one order, either orientation): dS cancels as torch's does. 16-bit
inputs keep delta alone: there the remainder is ~1e-4 of the dtype's own rounding.
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
Limits: head_dim in {16, 32, 64, 128}; (B, S, H, D) operands with the last dim contiguous, any other
strides; fp16/bf16 (fp32 accumulation) and fp32 (IEEE dot products). The tiles (BLOCK_M queries,
BLOCK_N keys, warps, stages) are chosen by the launchers: one fixed config per kernel and head dim, or
an autotuned one on CUDA (roberta_kernels.attention.autotune_space). Dropout needs BLOCK_N a multiple of 16.
"""

import triton
import triton.language as tl


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


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
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
            acc, l_i, m_i, q, seg_q, k_base, v_base, KPM_ptr, SEG_ptr, b, bh, rows,
            tl.multiple_of(start_n, BLOCK_N), hi, S, stride_ks, stride_vs, stride_mb, stride_gb, qk_scale,
            n_groups, drop_threshold, seed, False, HAS_KPM, HAS_SEG, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N,
            HEAD_DIM,
        )  # fmt: skip
    for start_n in range(hi_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, seg_q, k_base, v_base, KPM_ptr, SEG_ptr, b, bh, rows,
            tl.multiple_of(start_n, BLOCK_N), hi, S, stride_ks, stride_vs, stride_mb, stride_gb, qk_scale,
            n_groups, drop_threshold, seed, True, HAS_KPM, HAS_SEG, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N,
            HEAD_DIM,
        )  # fmt: skip
    empty = l_i == 0.0
    o = acc * tl.where(empty, 0.0, drop_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = O_ptr + ((b.to(tl.int64) * S + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, o.to(O_ptr.dtype.element_ty), mask=rows[:, None] < S)
    tl.store(LSE_ptr + bh.to(tl.int64) * S + rows, lse, mask=rows < S)


@triton.jit
def _dq_block(
    dq,
    r,
    pk,
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
    """dQ += dS K for one key block: P = exp2(S * scale*log2e - lse), dS = P * (dP * Z - delta); IEEE
    also R += rowsum(P * dP * Z) and PK += P K (the fp32 correction in the module docstring)."""
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
        dp = tl.where(keep, dp, 0.0) * drop_scale
    if IEEE:
        r += tl.sum(p * dp, axis=1)
        pk += _dot(p, k, False)  # tf32: its factor delta - R is ~1e-7 of dP
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE), r, pk


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
def _attn_bwd_dq_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,  # (B, S, H, D), strided, last dim contiguous
    O_ptr,  # (B, S, H, D) contiguous
    DO_ptr,  # (B, S, H, D), strided, last dim contiguous
    LSE_ptr,  # (B, H, S) fp32
    Delta_ptr,  # (B, H, S) fp32, written here: rowsum(dO * O) (IEEE: rowsum(P * dP)), read by dK/dV
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
    delta_ptrs = Delta_ptr + bh.to(tl.int64) * S + rows
    if not IEEE:
        tl.store(delta_ptrs, delta, mask=rows < S)
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
    r = tl.zeros((BLOCK_M,), tl.float32)  # IEEE only, as pk: rowsum(P * dP), P K
    pk = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start_n in range(lo, hi_full, BLOCK_N):
        dq, r, pk = _dq_block(
            dq, r, pk, q, do, lse, delta, seg_q, k_base, v_base, KPM_ptr, SEG_ptr, b, bh, rows,
            tl.multiple_of(start_n, BLOCK_N), hi, S, stride_ks, stride_vs, stride_mb, stride_gb, qk_scale,
            drop_scale, n_groups, drop_threshold, seed, False, HAS_KPM, HAS_SEG, HAS_DROPOUT, IEEE,
            BLOCK_M, BLOCK_N, HEAD_DIM,
        )  # fmt: skip
    for start_n in range(hi_full, hi, BLOCK_N):
        dq, r, pk = _dq_block(
            dq, r, pk, q, do, lse, delta, seg_q, k_base, v_base, KPM_ptr, SEG_ptr, b, bh, rows,
            tl.multiple_of(start_n, BLOCK_N), hi, S, stride_ks, stride_vs, stride_mb, stride_gb, qk_scale,
            drop_scale, n_groups, drop_threshold, seed, True, HAS_KPM, HAS_SEG, HAS_DROPOUT, IEEE, BLOCK_M,
            BLOCK_N, HEAD_DIM,
        )  # fmt: skip
    if IEEE:  # dS with R in place of delta (module docstring); the dK/dV kernel reads R
        dq += (delta - r)[:, None] * pk
        tl.store(delta_ptrs, r, mask=rows < S)
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


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
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


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not recompile
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

"""Multi-head attention, non-causal, with a key padding mask, an optional document mask and dropout:
launchers, autograd Function, public functions and the PyTorch reference `attention_ref`.

Algorithm: FlashAttention-2 (Dao 2023, Algorithms 1 and 2) as Triton's fused-attention tutorial (06)
lays it out; the kernels and the full description (masks, block skipping, Philox dropout) are in
roberta_kernels/attention_kernels.py. Forward `_attn_fwd_kernel`; backward `_attn_bwd_dq_kernel` (dQ and
delta = rowsum(dO * O)) then `_attn_bwd_dkdv_kernel` (dK, dV on S^T = K Q^T), no atomics, written
straight into one (B, S, 3, H, D) gradient.
Tiles: on CUDA each kernel is autotuned (triton.autotune, keyed on seq len, head dim, the masks,
dropout and the dtypes) over `autotune_space(kernel, head_dim, dtype, dropout)`: a few tiles around
the default, pruned to those that fit sm_90 (shared memory <= 227 KB by `smem_estimate`, none of the
configs that sm_90 compiles showed to spill; tests/kernels/test_attention_autotune.py compiles every
one). In the interpreter (CPU tests) and while kernel_tools.trace records launches (the static report)
the launchers use the fixed `default_config` and never the autotuner, which would time on a GPU.
Limits: head_dim in {16, 32, 64, 128}; inputs shaped (B, S, H, D) (or (B, S, 3, H, D) packed) with
the last dim contiguous, any other strides; softmax_scale > 0; fp16/bf16 (fp32 accumulation) and
fp32 (IEEE dot products, one config: a correctness path, not a fast one). The dropout rate applied
is dropout_p rounded to a multiple of 1/256 (`attention_dropout_rate`).
"""

from __future__ import annotations

import torch
import triton

from roberta_kernels import sm90
from roberta_kernels._utils import check_dtype, check_runnable, new_seed, tracing
from roberta_kernels.attention_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
    _attn_keep_kernel,
)

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}
# the Autotuner adds every tensor argument's dtype to the key
TUNING_KEY = ["S", "HEAD_DIM", "HAS_KPM", "HAS_SEG", "HAS_DROPOUT", "IEEE"]


def _config(kernel: str, head_dim: int, dropout: bool) -> dict:
    """Default tiles per kernel ('fwd', 'dq', 'dkdv'), picked from sm_90 compiles (registers, spills,
    main-loop SASS per tile; see kernel_tools.perf_report) to fit 227 KB of shared memory, fp32 included.
    BLOCK_M counts queries, BLOCK_N keys."""
    wide = head_dim > 64
    if kernel == "fwd":  # 8 warps on 128x128: 472 SASS per 128x64 of scores vs 521 + spills on 4 warps;
        # with dropout 128x128 needs 255 registers and spills 8 B under triton 3.6 (the GPU machine's),
        # so dropout takes 128x64 (201 registers, 690 SASS per tile against 612)
        return dict(BLOCK_M=128, BLOCK_N=64 if wide or dropout else 128, num_warps=8, num_stages=2)
    if kernel == "dq":
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if wide else 4, num_stages=2)
    # dkdv: 64x128 spills a few registers with dropout (255 used), 64x64 at head dim 128 with documents
    # (56 B); 32 queries a block do not
    return dict(BLOCK_M=32 if dropout or wide else 64, BLOCK_N=64 if wide else 128, num_warps=8, num_stages=2)


def _as_config(d: dict) -> triton.Config:
    return triton.Config(
        dict(BLOCK_M=d["BLOCK_M"], BLOCK_N=d["BLOCK_N"]), num_warps=d["num_warps"], num_stages=d["num_stages"]
    )


def default_config(kernel: str, head_dim: int, dropout: bool) -> triton.Config:
    """The fixed config: the interpreter's, the static report's, and the first of every tuning space."""
    return _as_config(_config(kernel, head_dim, dropout))


def smem_estimate(kernel: str, config: triton.Config, head_dim: int, itemsize: int, dropout: bool) -> int:
    """Shared memory (bytes) of one CTA, an upper estimate fitted to sm_90 compiles: the streamed operand
    tiles x num_stages (K, V in the forward and dQ; Q, dO in dK/dV) and the resident ones, the per-stage
    row vectors (masks, ids, lse, delta), a (BLOCK_M, BLOCK_N) fp32 scratch for the dropout mask's
    layout change, and sm_90's reserved 1 KB."""
    bm, bn, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    streamed, resident = (bn, bm) if kernel in ("fwd", "dq") else (bm, bn)
    tiles = (2 * stages * streamed + 2 * resident) * head_dim * itemsize
    return tiles + 2 * stages * (bm + bn) * 4 + (bm * bn * 4 if dropout else 0) + 1024


# (kernel, head_dim, dropout, BLOCK_M, BLOCK_N, num_warps, num_stages) of 16-bit configs whose sm_90
# compile spills registers (tests/kernels/test_attention_autotune.py finds any the list misses)
SM90_SPILLS = frozenset(
    [
        ("fwd", 64, True, 128, 128, 8, 2),  # triton 3.6 (the GPU machine's): 8 B
        ("fwd", 64, True, 128, 128, 8, 3),  # triton 3.6: 48 B
        ("fwd", 64, True, 64, 128, 4, 2),  # triton 3.6: 32 B
        ("fwd", 64, True, 128, 64, 4, 2),
        ("fwd", 128, False, 128, 64, 4, 2),
        ("fwd", 128, True, 128, 64, 4, 2),
        ("dq", 32, True, 128, 128, 8, 2),
        ("dq", 64, True, 128, 128, 8, 2),
        ("dq", 64, True, 64, 128, 8, 2),  # these four: once the seed is not specialised (8-120 B)
        ("dkdv", 64, True, 64, 128, 8, 3),
        ("dkdv", 64, True, 64, 64, 4, 3),
        ("dkdv", 128, True, 32, 128, 8, 3),
        ("dq", 128, False, 64, 128, 8, 2),
        ("dq", 128, False, 128, 128, 8, 2),
        ("dq", 128, True, 64, 64, 4, 3),
        ("dq", 128, True, 128, 64, 8, 2),
        ("dq", 128, True, 64, 128, 8, 2),
        ("dkdv", 64, True, 64, 64, 4, 2),
        ("dkdv", 128, False, 64, 64, 4, 2),
        ("dkdv", 128, False, 64, 128, 8, 3),
        ("dkdv", 128, False, 64, 64, 4, 3),
        ("dkdv", 128, True, 64, 64, 4, 2),
        ("dkdv", 128, True, 64, 128, 8, 3),
        ("dkdv", 128, True, 64, 64, 4, 3),
    ]
)  # triton 3.9, kpm + seg


def _candidates(kernel: str, head_dim: int, dropout: bool) -> list[triton.Config]:
    """The 16-bit tiles worth timing around the default (BLOCK_M queries x BLOCK_N keys, warps, stages)."""
    wide = head_dim > 64
    if kernel == "fwd":
        tiles = [
            (128, 64 if wide else 128, 8, 3),
            (128, 64, 4, 2),
            (64, 64, 4, 3),
            (64, 64 if wide else 128, 4, 2),
        ]
    elif kernel == "dq":
        tiles = [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)]
    else:
        tiles = [(64, 64, 4, 2), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in tiles]


def autotune_space(kernel: str, head_dim: int, dtype: torch.dtype, dropout: bool) -> list[triton.Config]:
    """The configs the autotuner times for one kernel ('fwd', 'dq', 'dkdv'), head dim, dtype and
    dropout flag: the default first, then the candidates that fit sm_90 (shared memory within 227 KB
    by smem_estimate, not in SM90_SPILLS). fp32 has the default only (IEEE dots: no tensor cores)."""
    default = default_config(kernel, head_dim, dropout)
    if dtype == torch.float32:
        return [default]
    space = [default]
    for c in _candidates(kernel, head_dim, dropout):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        known_spill = (kernel, head_dim, dropout, m, n, c.num_warps, c.num_stages) in SM90_SPILLS
        fits = smem_estimate(kernel, c, head_dim, dtype.itemsize, dropout) <= sm90.SHARED_BYTES_PER_CTA
        if c not in space and fits and not known_spill:
            space.append(c)
    return space


def _prune(kernel: str):
    def early_config_prune(configs, named_args, **kwargs):
        return autotune_space(kernel, kwargs["HEAD_DIM"], named_args["Q_ptr"].dtype, kwargs["HAS_DROPOUT"])

    return early_config_prune


_AUTOTUNERS: dict = {}  # kernel -> triton Autotuner, built on first use on CUDA (never in the interpreter)


def _autotuner(kernel: str):
    if kernel not in _AUTOTUNERS:
        spaces = (
            autotune_space(kernel, d, dt, p)
            for d in HEAD_DIMS
            for dt in (torch.float16, torch.float32)
            for p in (False, True)
        )
        configs = list(dict.fromkeys(c for space in spaces for c in space))
        tune = triton.autotune(
            configs, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune(kernel)}
        )
        _AUTOTUNERS[kernel] = tune(KERNELS[kernel])
    return _AUTOTUNERS[kernel]


def tuned_configs(kernel: str) -> dict:
    """{tuning key: config} the autotuner chose for `kernel` so far in this process (for kernel_tools.bench);
    a key is (S, HEAD_DIM, HAS_KPM, HAS_SEG, HAS_DROPOUT, IEEE, *tensor dtypes)."""
    return dict(_AUTOTUNERS[kernel].cache) if kernel in _AUTOTUNERS else {}


def _launch(kernel: str, grid, args: tuple, flags: dict, device: torch.device, config) -> None:
    """Run one attention kernel at `config`; with None: through its autotuner on CUDA, else at the
    default config (the interpreter and kernel_tools.trace run or compile, but cannot time)."""
    if config is None and device.type == "cuda" and not tracing():
        _autotuner(kernel)[grid](*args, **flags)
        return
    config = config or default_config(kernel, flags["HEAD_DIM"], flags["HAS_DROPOUT"])
    KERNELS[kernel][grid](*args, **flags, **config.all_kwargs())


def attention_dropout_rate(p: float) -> float:
    """The dropout rate the kernels apply for a requested `p`: 8-bit keep decisions round it to a
    multiple of 1/256 (0.1 -> 26/256 = 0.1016); kept probabilities are scaled by 1/(1 - rate)."""
    return min(round(p * 256), 255) / 256


def _prep(q, k, v, key_padding_mask, segment_ids):
    check_runnable("attention", q, k, v, key_padding_mask, segment_ids)
    check_dtype("attention", q)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"roberta_kernels.attention: q, k, v must share one (batch, seq, heads, head_dim) shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"roberta_kernels.attention: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    B, S, H, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"roberta_kernels.attention: head_dim {D} is not supported (supported: {HEAD_DIMS})")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise ValueError(
                f"roberta_kernels.attention: key_padding_mask must be (batch, seq) = {(B, S)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        kpm = key_padding_mask.to(torch.int8).contiguous()
    seg = None
    if segment_ids is not None:
        if segment_ids.shape != (B, S):
            raise ValueError(f"roberta_kernels.attention: segment_ids must be (batch, seq) = {(B, S)}")
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


def _flags(q, kpm, seg, p_drop):
    return dict(
        HAS_KPM=kpm is not None,
        HAS_SEG=seg is not None,
        HAS_DROPOUT=p_drop > 0,
        IEEE=q.dtype == torch.float32,
        HEAD_DIM=q.shape[-1],
    )


def attention_fwd(q, k, v, kpm, seg, sm_scale, p_drop, seed, config: triton.Config | None = None):
    """(B, S, H, D) q, k, v (last dim contiguous) -> o (B, S, H, D) contiguous, lse (B, H, S) fp32.
    config: the tiles to use (None: autotuned on CUDA, default_config elsewhere)."""
    B, S, H, D = q.shape
    o = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, o, lse, kpm, seg,
        *_strides(q, k, v, kpm, seg),
        H, S, sm_scale * LOG2E, 1.0 / (1.0 - p_drop), round(p_drop * 256), seed,
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch("fwd", grid, args, _flags(q, kpm, seg, p_drop), q.device, config)
    return o, lse


def attention_bwd(
    do, q, k, v, o, lse, kpm, seg, sm_scale, p_drop, seed,
    dq_config: triton.Config | None = None, dkdv_config: triton.Config | None = None,
):  # fmt: skip
    """Gradients of attention_fwd: one (B, S, 3, H, D) tensor holding dq, dk, dv (configs as attention_fwd)."""
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
    flags = _flags(q, kpm, seg, p_drop)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch("dq", grid, (q, k, v, o, do, lse, delta, dq, kpm, seg, *args), flags, q.device, dq_config)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)  # noqa: E731
    _launch("dkdv", grid, (q, k, v, do, lse, delta, dk, dv, kpm, seg, *args), flags, q.device, dkdv_config)
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
        raise ValueError(f"roberta_kernels.attention: dropout_p={dropout_p} must be in [0, 1)")
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    if scale <= 0:
        raise ValueError(f"roberta_kernels.attention: softmax_scale={scale} must be > 0")
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
        raise ValueError(
            f"roberta_kernels.attention_qkvpacked: qkv must be (B, S, 3, H, D), got {tuple(qkv.shape)}"
        )
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

"""Cross-entropy over the vocabulary for the masked rows, mean over non-ignored rows.

Algorithm: `_ce_kernel`, one program per row, up to two passes over the row in BLOCK_V chunks:
- STATS: an online max / sum-exp (Milakov & Gimelshein 2018), so any vocabulary fits, giving the
  row's logsumexp; loss_i = lse_i - z_i[label_i] (0 for ignored rows) and hit_i = the row's first
  argmax (as torch.argmax) equals its label, for labelled rows only. The argmax costs nothing per
  element: a block's argmax is reduced only when its max beats the running max.
- GRAD: dlogits = (softmax - onehot(label)) * scale, 0 on ignored rows; may overwrite the logits in
  place (every element is read by the thread that then writes it). The second read hits L2 (a row
  of 50K bf16 logits is 100 KB; ~2 rows per SM are in flight).
z = logits upcast to fp32 (the fused decoder's GEMM has added its bias). Columns 0..V_load come from
rows of stride `stride_row`: a stride and V_load that are multiples of 16 give 16-byte vector loads
(V = 50265 in rows of 50265 gives scalar 2-byte loads: every address is odd-aligned). The fused
decoder passes V_load = V rounded down to 64 and the last V - V_load (< 64) columns of each row in a
contiguous (N, V - V_load) `tail` of their own (linear_cross_entropy says why): one masked block per
pass, its gradient written in place. The one-hot term is written after the loops, once per row, not
compared per element.
Labels: in [0, V) or ignore_index (which may itself be a class id: those rows are ignored). Any other
label never reaches memory (it is clamped) and clears *Ok; `check_labels` turns that into an
IndexError on CPU tensors, and on CUDA into an asynchronous device assert (as torch's own CUDA
cross-entropy does), so no host sync is needed.
The mean divides by max(n_valid, 1): a batch with no labelled row has loss 0, never NaN. Logits of
any float dtype; math in fp32. Reference: `cross_entropy_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from roberta_kernels._utils import check_dtype, check_runnable


@triton.jit
def _stats_block(z, start, m, s, arg):
    """Fold a block of fp32 logits (its first column is `start`) into the running max m, sum-exp s
    (relative to m) and first argmax."""
    block_max = tl.max(z, axis=0)
    if block_max > m:  # rare after the first blocks: the argmax reduction runs only here
        arg = start + tl.argmax(z, axis=0)
    m_new = tl.maximum(m, block_max)
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
    return m_new, s, arg


@triton.jit
def _ce_kernel(
    Logits_ptr,  # (N, >= V_load), row stride stride_row: columns 0..V_load
    Tail_ptr,  # (N, V - V_load) contiguous, columns V_load..V, or None (then V_load == V)
    Labels_ptr,  # (N,) int64
    Loss_ptr,  # (N,) fp32, written when STATS
    LSE_ptr,  # (N,) fp32, written when STATS, else read
    Hit_ptr,  # (N,) int32, written when STATS: 1 where a labelled row's argmax is its label
    DLogits_ptr,  # (N, >= V_load), row stride stride_drow; written when GRAD (may be Logits_ptr;
    #               with a Tail it is, and the tail's gradient overwrites the Tail)
    Scale_ptr,  # () fp32 or None: the gradient is multiplied by scale * *Scale_ptr
    Ok_ptr,  # () int32, set to 0 when a label is neither in [0, V) nor ignore_index
    scale,
    V,
    V_load,
    stride_row,
    stride_drow,
    ignore_index,
    STATS: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_T: tl.constexpr,  # >= V - V_load with a Tail
):
    row = tl.program_id(0).to(tl.int64)
    label64 = tl.load(Labels_ptr + row)
    ignored = label64 == ignore_index
    in_range = (label64 >= 0) & (label64 < V)
    valid = in_range & ~ignored
    label = tl.where(valid, label64, 0).to(tl.int32)  # never addresses memory out of the row
    base = Logits_ptr + row * stride_row
    label_ptr = base + label
    if Tail_ptr is not None:
        n_tail = V - V_load
        tail = Tail_ptr + row * n_tail
        tcols = tl.arange(0, BLOCK_T)
        label_ptr = tl.where(label < V_load, label_ptr, tail + (label - V_load))
    # The target logit, read before the gradient pass may overwrite the row in place.
    target = tl.load(label_ptr).to(tl.float32)
    if STATS:
        tl.store(Ok_ptr, 0, mask=~(ignored | in_range))
        m = -float("inf")
        s = 0.0
        arg = 0
        for start in range(0, V_load, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V_load, other=-float("inf")).to(tl.float32)
            m, s, arg = _stats_block(z, start, m, s, arg)
        if Tail_ptr is not None:
            z_tail = tl.load(tail + tcols, mask=tcols < n_tail, other=-float("inf")).to(tl.float32)
            m, s, arg = _stats_block(z_tail, V_load, m, s, arg)
        lse = m + tl.log(s)
        tl.store(Loss_ptr + row, tl.where(valid, lse - target, 0.0))
        tl.store(LSE_ptr + row, lse)
        tl.store(Hit_ptr + row, (valid & (arg == label)).to(tl.int32))
    else:
        lse = tl.load(LSE_ptr + row)
    if GRAD:
        g_scale = tl.where(valid, scale, 0.0)
        if Scale_ptr is not None:
            g_scale *= tl.load(Scale_ptr)
        dbase = DLogits_ptr + row * stride_drow
        for start in range(0, V_load, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V_load, other=-float("inf")).to(tl.float32)
            g = tl.exp(z - lse) * g_scale
            tl.store(dbase + cols, g.to(DLogits_ptr.dtype.element_ty), mask=cols < V_load)
        dlabel_ptr = dbase + label
        if Tail_ptr is not None:
            z_tail = tl.load(tail + tcols, mask=tcols < n_tail, other=-float("inf")).to(tl.float32)
            g_tail = tl.exp(z_tail - lse) * g_scale
            tl.store(tail + tcols, g_tail.to(Tail_ptr.dtype.element_ty), mask=tcols < n_tail)
            dlabel_ptr = tl.where(label < V_load, dlabel_ptr, tail + (label - V_load))
        # softmax - onehot: the label's element, rewritten once after the whole row is stored
        # (the barrier orders it after the loop's store of that element by another thread)
        tl.debug_barrier()
        g_label = (tl.exp(target - lse) - 1.0) * g_scale
        tl.store(dlabel_ptr, g_label.to(DLogits_ptr.dtype.element_ty), mask=valid)


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def ce_launch(
    logits, tail, labels, loss, lse, hit, dlogits, scale_t, ok, scale, V, ignore_index, *, stats, grad
):
    """One `_ce_kernel` launch over the rows of `logits` (N, V_load): columns V_load.. V are in
    `tail` (N, V - V_load) contiguous, or there are none (tail None); see the module docstring."""
    N, V_load = logits.shape
    if N == 0:
        return
    _ce_kernel[(N,)](
        logits,
        tail,
        labels,
        loss,
        lse,
        hit,
        dlogits,
        scale_t,
        ok,
        scale,
        V,
        V_load,
        logits.stride(0),
        dlogits.stride(0) if dlogits is not None else 0,
        ignore_index,
        STATS=stats,
        GRAD=grad,
        BLOCK_V=_block_v(V_load),
        BLOCK_T=triton.next_power_of_2(V - V_load) if tail is not None else 1,
        num_warps=8,
    )


def check_labels(ok: torch.Tensor, labels: torch.Tensor, V: int, ignore_index: int, name: str) -> None:
    """Raise for labels outside [0, V) other than ignore_index, found by `_ce_kernel` (*ok == 0).
    CPU: an IndexError now. CUDA: torch._assert_async, which fails at a later synchronisation with
    a device-side assert, like torch's own CUDA cross-entropy; never a host sync here."""
    if ok.device.type == "cpu":
        if not ok.item():
            bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= V))]
            raise IndexError(
                f"roberta_kernels.{name}: target {bad[0].item()} is out of bounds for {V} classes "
                f"(labels must be in [0, {V}) or ignore_index={ignore_index})"
            )
    elif ok.device.type == "cuda":
        torch._assert_async(
            ok.bool().view(()), f"roberta_kernels.{name}: a label is out of bounds for {V} classes"
        )


def cross_entropy_fwd(logits, labels, ignore_index):
    check_runnable("cross_entropy", logits, labels)
    check_dtype("cross_entropy", logits)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"roberta_kernels.cross_entropy: logits (N, V) and labels (N,) expected, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    loss, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    hit = torch.empty(N, dtype=torch.int32, device=logits.device)
    ok = torch.ones((), dtype=torch.int32, device=logits.device)
    ce_launch(
        logits, None, labels, loss, lse, hit, None, None, ok, 1.0, V, ignore_index, stats=True, grad=False
    )
    check_labels(ok, labels, V, ignore_index, "cross_entropy")
    return loss, lse, logits


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        labels = labels.long()
        loss_rows, lse, logits_c = cross_entropy_fwd(logits, labels, ignore_index)
        n_valid = (labels != ignore_index).sum().clamp(min=1).float()
        ctx.save_for_backward(logits_c, labels, lse, n_valid)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, n_valid = ctx.saved_tensors
        dlogits = torch.empty_like(logits)
        scale_t = (dloss.float() / n_valid).reshape(())  # fp32 on the device: a loss scale cannot overflow
        V = logits.shape[1]
        ce_launch(
            logits, None, labels, None, lse, None, dlogits, scale_t, None, 1.0, V, ctx.ignore_index,
            stats=False, grad=True,
        )  # fmt: skip
        return dlogits, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over rows whose label != ignore_index (0 when there are none).
    logits (N, V) any float dtype, labels (N,) int in [0, V) or ignore_index; returns a () fp32
    tensor. Other labels raise IndexError (CPU) or a device-side assert (CUDA)."""
    return _CrossEntropy.apply(logits, labels, ignore_index)


def cross_entropy_ref(
    logits: torch.Tensor,  # (N, V)
    labels: torch.Tensor,  # (N,) int64
    ignore_index: int = -100,
) -> torch.Tensor:  # () fp32
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 in fp32; fp64 stays fp64
    total = F.cross_entropy(logits.to(acc), labels, ignore_index=ignore_index, reduction="sum")
    return total / n_valid

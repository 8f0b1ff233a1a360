import pytest
import torch
import torch.nn.functional as F

from roberta_kernels import linear_cross_entropy, linear_cross_entropy_ref
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, check_close


def rounded_inputs(N, D, V, dtype, bias=True, scale=(1, 0.2)):
    """h (N, D), W (V, D), b (V,) drawn in fp64 and rounded to `dtype`, returned in fp64. The kernel
    and torch both get the rounded numbers, so the fp64 reference must start from them too (as
    flash-attention's tests do): from the unrounded ones it would also count the inputs' own rounding
    (fp16, D = 1000: ~3e-4 on the loss), which belongs to neither path, and the two errors' ratio
    would be chance (one path's rounding may cancel part of it, the other's not)."""
    h = scale[0] * torch.randn(N, D, dtype=torch.float64, device=DEVICE)
    w = scale[1] * torch.randn(V, D, dtype=torch.float64, device=DEVICE)
    b = 0.1 * torch.randn(V, dtype=torch.float64, device=DEVICE) if bias else None
    return (t.to(dtype).double() if t is not None else None for t in (h, w, b))


def run_all(
    N,
    D,
    V,
    dtype,
    ignored=0,
    dloss=1.3,
    bias=True,
    ignore_index=-100,
    chunk_rows=None,
    labels=None,
    scale=(1, 0.2),
):
    h64, w64, b64 = rounded_inputs(N, D, V, dtype, bias, scale)
    if labels is None:
        labels = torch.randint(0, V, (N,), device=DEVICE)
        labels[torch.randperm(N)[:ignored]] = ignore_index
    out = {}
    for name, dt in (("kernel", dtype), ("torch", dtype), ("ref", torch.float64)):
        h, w = (t.to(dt).requires_grad_() for t in (h64, w64))
        b = b64.to(dt).requires_grad_() if bias else None
        if name == "kernel":
            loss, correct = linear_cross_entropy(h, w, b, labels, ignore_index, chunk_rows=chunk_rows)
        else:
            loss, correct = linear_cross_entropy_ref(h, w, b, labels, ignore_index)
        loss.backward(torch.tensor(dloss, dtype=loss.dtype, device=DEVICE))
        out[name] = (loss, h.grad, w.grad, b.grad if bias else None, correct)
    return out, labels


def check_all(out, dtype, grad_atol):
    check_close(out["kernel"][0], out["torch"][0], out["ref"][0], 1e-5, "loss")
    for i, what in ((1, "dh"), (2, "dweight"), (3, "dbias")):
        if out["ref"][i] is not None:
            assert out["kernel"][i].dtype == dtype and torch.isfinite(out["kernel"][i]).all(), what
            check_close(out["kernel"][i], out["torch"][i], out["ref"][i], grad_atol, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N, D, V, ignored, chunk_rows",
    [(1, 64, 100, 0, None), (300, 64, 5003, 40, None), (300, 64, 5003, 40, 128), (37, 128, 1000, 37, 16)],
)
def test_forward_and_every_gradient(N, D, V, ignored, chunk_rows, dtype):
    out, _ = run_all(N, D, V, dtype, ignored, chunk_rows=chunk_rows)
    check_all(out, dtype, ATOL[dtype])
    if dtype == torch.float32:
        assert out["kernel"][4].item() == out["ref"][4].item()


@pytest.mark.parametrize("loss_scale", [2.0**16, 2.0**24], ids=["2^16", "2^24"])
@pytest.mark.parametrize("chunk_rows", [None, 32], ids=["one-chunk", "chunks"])
def test_fp16_loss_scales_give_finite_correct_gradients(loss_scale, chunk_rows):
    # Distinct labels, small h and W: the scaled true gradients fit fp16 (|db| <= 2^24 / 290 < 65504),
    # so they must come out finite and as close to the float64 ones as torch's own fp16 path.
    labels = torch.randperm(1000, device=DEVICE)[:300]
    labels[:10] = -100
    out, _ = run_all(
        300,
        64,
        1000,
        torch.float16,
        dloss=loss_scale,
        chunk_rows=chunk_rows,
        labels=labels,
        scale=(0.1, 0.02),
    )
    check_all(out, torch.float16, ATOL[torch.float16] * loss_scale / 290)


def test_ignore_index_may_be_a_class_id():
    labels = torch.randint(0, 50, (40,), device=DEVICE)
    labels[::3] = 7  # rows labelled 7 are ignored, also in `correct`
    out, _ = run_all(40, 64, 50, torch.float32, labels=labels, ignore_index=7)
    check_all(out, torch.float32, ATOL[torch.float32])
    assert out["kernel"][4].item() == out["ref"][4].item()


def test_argmax_hits_are_counted_only_for_labelled_rows():
    h = torch.randn(30, 32, device=DEVICE)
    w = torch.randn(40, 32, device=DEVICE)
    labels = (h @ w.t()).argmax(-1)  # every row right ...
    labels[:10] = -100  # ... but only 20 are labelled
    assert linear_cross_entropy(h, w, None, labels)[1].item() == 20


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_bias_and_with_hidden_1000(dtype):
    out, _ = run_all(33, 1000, 517, dtype, ignored=3, bias=False)
    check_all(out, dtype, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_row_loss_within_twice_a_16bit_decoder_error(dtype):
    """Issue 19: the peer is transformers' decoder in `dtype` followed by an fp32 loss. When h.W was
    rounded to 16 bits and the bias added afterwards, each row's loss erred as much as the peer's but
    independently, so rows (and a mean over few rows) came out up to 27x the peer's error; with the
    bias in the GEMM each logit is rounded as the peer rounds it (V = 1000: 960 aligned columns and a
    tail of 40, each its own GEMM). Each row's loss, one call per labelled row, then every gradient
    on a batch of that shape."""
    N, D, V = 12, 768, 1000
    h, w, b = (t.to(dtype) for t in rounded_inputs(N, D, V, dtype))
    labels = torch.randint(0, V, (N,), device=DEVICE)
    ref = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), labels, reduction="none")
    peer = F.cross_entropy(F.linear(h, w, b).float(), labels, reduction="none")
    for i in range(N):
        only_i = torch.full_like(labels, -100)
        only_i[i] = labels[i]
        check_close(linear_cross_entropy(h, w, b, only_i)[0], peer[i], ref[i], 1e-5, f"row {i} loss")
    out, _ = run_all(N, D, V, dtype, labels=labels)
    check_all(out, dtype, ATOL[dtype])


@pytest.mark.parametrize("V", [129, 100], ids=["tail-1", "tail-36"])
def test_labels_and_argmax_in_the_unaligned_last_columns(V):
    """The last V % 64 columns have their own GEMMs and buffer: labels and argmaxes there count as
    anywhere else."""
    Va = V // 64 * 64
    h64, w64, b64 = rounded_inputs(20, 64, V, torch.float32)
    b64[Va:] += 100.0  # every row's argmax in the tail
    labels = F.linear(h64, w64, b64).argmax(-1)
    labels[:4] = torch.arange(4, device=DEVICE)  # and some labels in the aligned part
    out = {}
    for name, dt in (("kernel", torch.float32), ("ref", torch.float64)):
        h, w, b = (t.to(dt).requires_grad_() for t in (h64, w64, b64))
        fn = linear_cross_entropy if name == "kernel" else linear_cross_entropy_ref
        loss, correct = fn(h, w, b, labels)
        loss.backward()
        out[name] = (loss, h.grad, w.grad, b.grad, correct)
    assert out["kernel"][4].item() == out["ref"][4].item() == 16
    for i, what in enumerate(("loss", "dh", "dweight", "dbias")):
        assert torch.allclose(out["kernel"][i].double(), out["ref"][i], atol=1e-5), what


@pytest.mark.parametrize("bad", [517, 10**6, -1, -101])
def test_out_of_range_labels_raise(bad):
    h, w = torch.randn(6, 64, device=DEVICE), torch.randn(517, 64, device=DEVICE)
    labels = torch.tensor([3, -100, bad, 5, 516, 0], device=DEVICE)
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds for 517 classes"):
        linear_cross_entropy(h, w, torch.zeros(517, device=DEVICE), labels)


def test_no_masked_row_gives_zero_loss_and_zero_gradients():
    for N in (0, 5):
        h = torch.randn(N, 64, device=DEVICE, requires_grad=True)
        w = torch.randn(50, 64, device=DEVICE, requires_grad=True)
        b = torch.randn(50, device=DEVICE, requires_grad=True)
        loss, correct = linear_cross_entropy(h, w, b, torch.full((N,), -100, device=DEVICE))
        loss.backward()
        assert loss.item() == 0.0 and correct.item() == 0
        assert not h.grad.any() and not w.grad.any() and not b.grad.any()


def test_no_grad_mode_computes_only_the_loss():
    h, w, b = (
        torch.randn(9, 64, device=DEVICE, requires_grad=True),
        torch.randn(70, 64, device=DEVICE, requires_grad=True),
        torch.randn(70, device=DEVICE),
    )
    labels = torch.randint(0, 70, (9,), device=DEVICE)
    with torch.no_grad():
        loss, correct = linear_cross_entropy(h, w, b, labels)
    assert loss.grad_fn is None
    ref, ref_correct = linear_cross_entropy_ref(h, w, b, labels)
    assert torch.allclose(loss, ref, atol=1e-5) and correct.item() == ref_correct.item()


def test_shape_and_dtype_errors():
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, None, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="share one dtype"):
        linear_cross_entropy(h, w.half(), None, torch.zeros(4, dtype=torch.long, device=DEVICE))

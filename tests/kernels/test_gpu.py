"""On a GPU only: bf16 at the presets' real shapes (the CPU interpreter's bf16 is wrong,
triton-lang/triton#11584), and the model's `auto` backend picking the kernels."""

import pytest
import torch

import roberta_ds
from roberta_kernels import (
    attention_qkvpacked,
    attention_ref,
    layer_norm,
    layer_norm_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from roberta_kernels.attention import attention_dropout_keep, attention_dropout_rate
from roberta_kernels.layer_norm import layer_norm_dropout_keep
from tests.kernels.conftest import check_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("S, H, D", [(512, 12, 64), (128, 16, 64), (512, 8, 128)])
def test_attention_bf16_at_preset_shapes(S, H, D, dropout_p):
    """The packed entry the model uses, with padding and packed documents, at the real tiles."""
    B = 4
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.float64)
    kpm = torch.ones(B, S, dtype=torch.bool, device="cuda")
    kpm[1, S // 2 :] = False
    kpm[2, S - 5 :] = False
    seg = torch.zeros(B, S, dtype=torch.long, device="cuda")
    seg[3, S // 3 :] = 1
    seg[3, S // 2 + 7 :] = 2
    do = torch.randn(B, S, H, D, device="cuda", dtype=torch.float64)
    keep = attention_dropout_keep(11, B, H, S, dropout_p, "cuda") if dropout_p else None
    p = attention_dropout_rate(dropout_p)
    res = {}
    for name, dt in (("k", torch.bfloat16), ("t", torch.bfloat16), ("r", torch.float64)):
        x = qkv.to(dt).requires_grad_()
        if name == "k":
            o = attention_qkvpacked(x, kpm, segment_ids=seg, dropout_p=dropout_p, dropout_seed=11)
        else:
            o = attention_ref(*x.unbind(2), kpm, segment_ids=seg, dropout_p=p, keep=keep)
        o.backward(do.to(dt))
        res[name] = (o, x.grad)
    check_close(res["k"][0], res["t"][0], res["r"][0], 2e-2, "out")
    check_close(res["k"][1], res["t"][1], res["r"][1], 2e-2 * S**0.5, "dqkv")


@pytest.mark.parametrize("N", [768, 1024])
def test_layer_norm_bf16_16k_rows(N):
    x, r = (torch.randn(16384, N, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = (
        torch.randn(N, device="cuda", dtype=torch.bfloat16),
        torch.randn(N, device="cuda", dtype=torch.bfloat16),
    )
    ref64 = layer_norm_ref(x.double(), w.double(), b.double(), residual=r.double())
    check_close(layer_norm(x, w, b, residual=r), layer_norm_ref(x, w, b, residual=r), ref64, 2e-2, "y")


def test_layer_norm_dropout_bf16_uses_one_mask_forward_and_backward():
    x, r, dy = (torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    x.requires_grad_()
    w, b = torch.randn(768, device="cuda", dtype=torch.bfloat16), torch.zeros(768, device="cuda")
    layer_norm(x, w, b.bfloat16(), residual=r, dropout_p=0.1, dropout_seed=11).backward(dy)
    keep = layer_norm_dropout_keep(11, 4096, 768, 0.1, "cuda")
    assert abs(keep.float().mean().item() - 0.9) <= 0.01 and torch.equal(x.grad != 0, keep)


@pytest.mark.parametrize(
    "dtype, chunk_rows, dloss",
    [(torch.bfloat16, None, 1.0), (torch.bfloat16, 1024, 0.5), (torch.float16, None, 2.0**16)],
)
def test_linear_cross_entropy_at_the_base_head_shape(dtype, chunk_rows, dloss):
    N, D, V = 2458, 768, 50265  # the masked rows of a base micro-batch (32 x 512)
    h64 = torch.randn(N, D, device="cuda", dtype=torch.float64)
    w64 = 0.02 * torch.randn(V, D, device="cuda", dtype=torch.float64)
    b64 = 0.02 * torch.randn(V, device="cuda", dtype=torch.float64)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[::7] = -100
    res = {}
    for name, fn, dt in (
        ("k", linear_cross_entropy, dtype),
        ("t", linear_cross_entropy_ref, dtype),
        ("r", linear_cross_entropy_ref, torch.float64),
    ):
        h, w, b = (t.to(dt).requires_grad_() for t in (h64, w64, b64))
        kw = {"chunk_rows": chunk_rows} if fn is linear_cross_entropy else {}
        loss, correct = fn(h, w, b, labels, **kw)
        loss.backward(torch.tensor(dloss, device="cuda"))
        res[name] = (loss, h.grad, w.grad, b.grad)
    check_close(res["k"][0], res["t"][0], res["r"][0], 1e-3, "loss")
    for i, what in ((1, "dh"), (2, "dweight"), (3, "dbias")):
        assert torch.isfinite(res["k"][i]).all(), what
        check_close(res["k"][i], res["t"][i], res["r"][i], 2e-2 * dloss / N**0.5, what)


def test_model_auto_backend_uses_triton_on_cuda_and_trains_in_bf16():
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset("base", kernels="auto")).cuda().to(torch.bfloat16)
    assert model.ops.backend == "triton"
    ids = torch.randint(4, 50000, (8, 512), device="cuda")
    labels = torch.where(torch.rand(8, 512, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    out = model(ids, torch.ones_like(ids), labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and 9 < out.loss.item() < 13  # ~ln(50265) at init

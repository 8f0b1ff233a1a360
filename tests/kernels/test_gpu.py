"""On a GPU only: bf16 at the presets' real shapes (the CPU interpreter's bf16 is wrong,
triton-lang/triton#11584), and the model's `auto` backend picking the kernels."""

import pytest
import torch

import roberta_ds
from kernels import attention, attention_ref, layer_norm, layer_norm_ref
from tests.kernels.conftest import check_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("S, H, D", [(512, 12, 64), (128, 16, 64), (512, 8, 128)])
def test_attention_bf16_at_preset_shapes(S, H, D):
    B = 4
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.float64)
    kpm = torch.ones(B, S, dtype=torch.bool, device="cuda")
    kpm[1, S // 2 :] = False
    do = torch.randn(B, S, H, D, device="cuda", dtype=torch.float64)
    res = {}
    for name, fn, dt in (
        ("k", attention, torch.bfloat16),
        ("t", attention_ref, torch.bfloat16),
        ("r", attention_ref, torch.float64),
    ):
        x = qkv.to(dt).requires_grad_()
        o = fn(*x.unbind(2), key_padding_mask=kpm)
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


def test_model_auto_backend_uses_triton_on_cuda_and_trains_in_bf16():
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset("base", kernels="auto")).cuda().to(torch.bfloat16)
    assert model.ops.backend == "triton"
    ids = torch.randint(4, 50000, (8, 512), device="cuda")
    labels = torch.where(torch.rand(8, 512, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    out = model(ids, torch.ones_like(ids), labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and 9 < out.loss.item() < 13  # ~ln(50265) at init

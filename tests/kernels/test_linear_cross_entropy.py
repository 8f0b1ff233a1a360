import pytest
import torch

from kernels import linear_cross_entropy, linear_cross_entropy_ref
from kernels.linear_cross_entropy import _chunk_rows
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, check_close


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, D, V, ignored", [(1, 64, 100, 0), (300, 64, 5003, 40), (37, 128, 1000, 37)])
def test_forward_and_every_gradient(N, D, V, ignored, dtype):
    h64 = torch.randn(N, D, dtype=torch.float64, device=DEVICE)
    w64 = 0.2 * torch.randn(V, D, dtype=torch.float64, device=DEVICE)
    b64 = 0.1 * torch.randn(V, dtype=torch.float64, device=DEVICE)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.randperm(N)[:ignored]] = -100
    out = {}
    for name, fn, dt in (
        ("kernel", linear_cross_entropy, dtype),
        ("torch", linear_cross_entropy_ref, dtype),
        ("ref", linear_cross_entropy_ref, torch.float64),
    ):
        h, w, b = (t.to(dt).requires_grad_() for t in (h64, w64, b64))
        loss, correct = fn(h, w, b, labels)
        loss.backward(torch.tensor(1.3, dtype=loss.dtype, device=DEVICE))
        out[name] = (loss, h.grad, w.grad, b.grad, correct)
    atol = ATOL[dtype]
    check_close(out["kernel"][0], out["torch"][0], out["ref"][0], 1e-5, "loss")
    for i, what in ((1, "dh"), (2, "dweight"), (3, "dbias")):
        check_close(out["kernel"][i], out["torch"][i], out["ref"][i], atol, what)
    if dtype == torch.float32:
        assert out["kernel"][4].item() == out["ref"][4].item()
    assert N == 1 or _chunk_rows(N, V, D) < N or ignored == N  # several chunks were exercised


def test_all_ignored_gives_zero_and_zero_gradients():
    h = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(50, device=DEVICE, requires_grad=True)
    loss, _ = linear_cross_entropy(h, w, b, torch.full((5,), -100, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any() and not b.grad.any()


def test_no_grad_mode_computes_only_the_loss():
    h, w, b = (
        torch.randn(9, 64, device=DEVICE),
        torch.randn(70, 64, device=DEVICE),
        torch.randn(70, device=DEVICE),
    )
    labels = torch.randint(0, 70, (9,), device=DEVICE)
    with torch.no_grad():
        loss, correct = linear_cross_entropy(h, w, b, labels)
    ref, ref_correct = linear_cross_entropy_ref(h, w, b, labels)
    assert torch.allclose(loss, ref, atol=1e-5) and correct.item() == ref_correct.item()

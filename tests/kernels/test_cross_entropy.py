import pytest
import torch

from roberta_kernels import cross_entropy, cross_entropy_ref
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, check_close


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, V, ignored", [(1, 7, 0), (37, 5003, 5), (64, 50265, 10), (16, 4096, 15)])
def test_cross_entropy_forward_and_gradient(N, V, ignored, dtype):
    logits64 = 3 * torch.randn(N, V, dtype=torch.float64, device=DEVICE)
    labels = torch.randint(0, V, (N,), device=DEVICE)
    labels[torch.randperm(N)[:ignored]] = -100
    out = {}
    for name, fn, dt in (
        ("kernel", cross_entropy, dtype),
        ("torch", cross_entropy_ref, dtype),
        ("ref", cross_entropy_ref, torch.float64),
    ):
        x = logits64.to(dt).requires_grad_()
        loss = fn(x, labels)
        loss.backward(torch.tensor(1.7, dtype=loss.dtype, device=DEVICE))
        out[name] = (loss, x.grad)
    check_close(out["kernel"][0], out["torch"][0], out["ref"][0], 1e-5, "loss")
    check_close(out["kernel"][1], out["torch"][1], out["ref"][1], ATOL[dtype] * 0.1, "dlogits")
    if ignored:
        assert (out["kernel"][1][labels == -100] == 0).all()


def test_all_rows_ignored_gives_zero_not_nan():
    x = torch.randn(4, 100, device=DEVICE, requires_grad=True)
    loss = cross_entropy(x, torch.full((4,), -100, device=DEVICE))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert (
        cross_entropy(
            torch.randn(0, 100, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE)
        ).item()
        == 0.0
    )


def test_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        cross_entropy(torch.randn(2, 3, 4, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("bad", [100, -1])
def test_out_of_range_labels_raise(bad):
    labels = torch.tensor([1, bad, -100, 99], device=DEVICE)
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds for 100 classes"):
        cross_entropy(torch.randn(4, 100, device=DEVICE), labels)


def test_ignore_index_may_be_a_class_id():
    x64 = torch.randn(9, 30, dtype=torch.float64, device=DEVICE)
    labels = torch.tensor([3, 0, 3, 29, 5, 3, 1, 2, 3], device=DEVICE)
    x = x64.float().requires_grad_()
    loss = cross_entropy(x, labels, ignore_index=3)
    loss.backward()
    ref = x64.clone().requires_grad_()
    cross_entropy_ref(ref, labels, ignore_index=3).backward()
    assert torch.allclose(loss.double(), cross_entropy_ref(x64, labels, ignore_index=3), atol=1e-6)
    assert torch.allclose(x.grad.double(), ref.grad, atol=1e-6) and not x.grad[labels == 3].any()


def test_fp16_loss_scale_2_24_stays_finite():
    x64 = torch.randn(300, 64, dtype=torch.float64, device=DEVICE)
    labels = torch.randint(0, 64, (300,), device=DEVICE)
    grads = []
    for fn, dt in (
        (cross_entropy, torch.float16),
        (cross_entropy_ref, torch.float16),
        (cross_entropy_ref, torch.float64),
    ):
        x = x64.to(dt).requires_grad_()
        fn(x, labels).backward(torch.tensor(2.0**24, device=DEVICE))
        grads.append(x.grad)
    assert torch.isfinite(grads[0]).all()
    check_close(grads[0], grads[1], grads[2], ATOL[torch.float16] * 2**24 / 300, "dlogits")

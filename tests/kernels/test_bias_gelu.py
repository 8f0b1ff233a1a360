import pytest
import torch

from roberta_kernels import bias_gelu, bias_gelu_ref
from tests.kernels.conftest import ATOL, DEVICE, DTYPES, check_close

SHAPES = [(1, 1, 8), (2, 7, 1000), (3, 64, 3072), (5, 257), (100, 64)]  # (100, 64): 7 runs of rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_gelu_forward_and_gradients(shape, dtype):
    x64 = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    b64 = torch.randn(shape[-1], dtype=torch.float64, device=DEVICE)
    dy64 = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    results = {}
    for name, fn, dt in (
        ("kernel", bias_gelu, dtype),
        ("torch", bias_gelu_ref, dtype),
        ("ref", bias_gelu_ref, torch.float64),
    ):
        x = x64.to(dt).requires_grad_()
        b = b64.to(dt).requires_grad_()
        y = fn(x, b)
        y.backward(dy64.to(dt))
        results[name] = (y, x.grad, b.grad)
    atol = ATOL[dtype] * (shape[0] if len(shape) == 2 else shape[0] * shape[1]) ** 0.5
    for i, what in enumerate(("y", "dx", "dbias")):
        check_close(
            results["kernel"][i],
            results["torch"][i],
            results["ref"][i],
            atol if what == "dbias" else ATOL[dtype],
            what,
        )
    assert results["kernel"][0].dtype == dtype


def test_non_contiguous_input():
    x = torch.randn(6, 40, device=DEVICE)[:, ::2]  # last dim strided
    b = torch.randn(20, device=DEVICE)
    assert torch.allclose(bias_gelu(x, b), bias_gelu_ref(x, b), atol=1e-6)


def test_bad_bias_shape():
    with pytest.raises(ValueError, match="bias shape"):
        bias_gelu(torch.randn(2, 8, device=DEVICE), torch.randn(7, device=DEVICE))

import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 arithmetic and tl.dot are wrong in Triton's CPU interpreter (triton-lang/triton#11584):
# bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def pytest_configure(config):
    assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1", (
        "tests/conftest.py sets TRITON_INTERPRET=1 on CPU"
    )


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_close(kernel_out, torch_out, ref64, atol, name=""):
    """err(kernel, fp64 ref) <= 2 * err(torch at the same dtype, fp64 ref) + atol."""
    k_err, t_err = max_err(kernel_out, ref64), max_err(torch_out, ref64)
    assert k_err <= 2 * t_err + atol, f"{name}: kernel err {k_err:.3e} vs torch err {t_err:.3e} (atol {atol})"


ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

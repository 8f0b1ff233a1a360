"""Shared launcher checks for the Triton kernels."""

from __future__ import annotations

import contextvars
import os

import torch

# Set by kernel_tools.trace while it records launches on meta tensors for an sm_90 compile: the SM count
# of the traced device (launchers that size persistent grids read it through sm_count), else None.
TRACE_TARGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("TRACE_TARGET", default=None)


def tracing() -> bool:
    return TRACE_TARGET.get() is not None


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (the traced target's while tracing; 4 in the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return TRACE_TARGET.get() or 4


def check_runnable(name: str, *tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            continue
        if t.device.type == "meta" and tracing():  # kernel_tools.trace: compiled for sm_90, never run
            continue
        raise RuntimeError(
            f"roberta_kernels.{name}: got a tensor on {t.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 "
            f"set before import, for CPU tests). Use roberta_kernels.{name}_ref for the PyTorch path."
        )


def check_dtype(name: str, t: torch.Tensor, allowed=(torch.float16, torch.bfloat16, torch.float32)) -> None:
    if t.dtype not in allowed:
        raise TypeError(
            f"roberta_kernels.{name}: dtype {t.dtype} is not supported (use one of {list(allowed)})"
        )


def new_seed() -> int:
    """A dropout seed drawn from torch's CPU generator, so torch.manual_seed makes kernels reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())

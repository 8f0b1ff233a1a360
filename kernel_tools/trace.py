"""Record the launch sequence of a PyTorch program without a GPU, compiling every Triton launch for sm_90.

`trace_launches(fn)` runs `fn` on meta tensors (shapes and strides, no data) with two recorders on:
- every Triton launch goes through Triton's own binder (so its specialisation is exactly a real
  launch's: 16-byte-aligned pointers and ints divisible by 16 marked, ints equal to 1 made constant)
  and is compiled for sm_90 (`SM90` below) instead of being run; the grid, the bound
  arguments and the CompiledKernel are kept;
- every aten op on meta tensors (the cuBLAS GEMMs and the torch glue between the kernels) is kept
  with its input and output shapes, so the cost model can count its FLOPs and bytes.
Meta tensors report `data_ptr() = storage_offset * itemsize`, i.e. a view's alignment as if its
base allocation were 16-byte aligned, which CUDA's caching allocator guarantees (512 B).
Data-dependent ops cannot run on meta tensors: `nonzero` is answered with `nonzero_fraction` of the
elements (the masked-token gather: 15%), and anything else data-dependent raises.
Launchers that size their grids by the device (SM count) ask `roberta_kernels._utils.sm_count`, which
answers the traced target's count (roberta_kernels.sm90.SM_COUNT) while tracing.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction

from roberta_kernels import _utils, sm90

SM90 = GPUTarget("cuda", sm90.COMPUTE_CAPABILITY, sm90.WARP_SIZE)


class TensorSpec(NamedTuple):
    """What the cost model needs of a tensor argument. No reference to the tensor itself is kept:
    holding one would make autograd copy the gradients the kernels produce instead of reusing them."""

    shape: tuple
    dtype: torch.dtype


@dataclass
class TritonLaunch:
    name: str  # the @triton.jit function's name
    grid: tuple[int, int, int]
    args: dict  # bound arguments by name: TensorSpec for tensors, ints, floats, constexprs
    num_warps: int
    num_stages: int
    kernel: object  # triton CompiledKernel for sm_90

    @property
    def ctas(self) -> int:
        return math.prod(self.grid)


@dataclass
class TorchOp:
    name: str  # e.g. "aten.mm.default"
    inputs: list = field(default_factory=list)  # [(shape, dtype)] of tensor inputs
    outputs: list = field(default_factory=list)  # [(shape, dtype)] of tensor outputs
    is_view: bool = False


class _SM90Driver:
    """The slice of Triton's driver interface that binding and compiling use, answering for an H100."""

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


def _tensor_specs(obj) -> list:
    out = []
    for t in obj if isinstance(obj, (list, tuple)) else [obj]:
        if isinstance(t, torch.Tensor):
            out.append((tuple(t.shape), t.dtype))
        elif isinstance(t, (list, tuple)):
            out.extend(_tensor_specs(t))
    return out


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, events: list, nonzero_fraction: float):
        super().__init__()
        self.events = events
        self.nonzero_fraction = nonzero_fraction

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors) or kwargs.get("device") == torch.device(
            "meta"
        )
        if func is torch.ops.aten.nonzero.default and on_meta:
            (x,) = args
            n = int(round(self.nonzero_fraction * x.numel()))
            out = torch.empty((n, x.dim()), dtype=torch.long, device="meta")
        else:
            out = func(*args, **kwargs)
        if on_meta:
            self.events.append(
                TorchOp(
                    name=str(func),
                    # an `out=` tensor is written, not read: it is counted once, as the output
                    inputs=_tensor_specs(list(args) + [v for k, v in kwargs.items() if k != "out"]),
                    outputs=_tensor_specs(out),
                    is_view=bool(getattr(func, "is_view", False)),
                )
            )
        return out


def _options(fn: JITFunction, kwargs: dict) -> tuple[int, int]:
    # Triton's own defaults (CUDAOptions: num_warps 4, num_stages 3) when the launcher sets none
    return int(kwargs.get("num_warps", 4)), int(kwargs.get("num_stages", 3))


@contextlib.contextmanager
def trace_launches(nonzero_fraction: float = 0.15):
    """Context manager yielding the list that fills with TritonLaunch / TorchOp events, in order."""
    events: list = []
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        bound = {
            k: TensorSpec(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
            for k, v in bound.items()
        }
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
        events.append(TritonLaunch(self.fn.__name__, g, bound, *_options(self, kwargs), kernel))
        return kernel

    JITFunction.run = run
    previous_driver = triton_driver._active  # None without a GPU: reset_active() would raise
    triton_driver.set_active(_SM90Driver())
    token = _utils.TRACE_TARGET.set(sm90.SM_COUNT)
    try:
        with _AtenRecorder(events, nonzero_fraction):
            yield events
    finally:
        _utils.TRACE_TARGET.reset(token)
        triton_driver._active = previous_driver
        JITFunction.run = orig_run


def check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "kernel_tools.trace compiles for sm_90: unset TRITON_INTERPRET before importing kernels"
        )

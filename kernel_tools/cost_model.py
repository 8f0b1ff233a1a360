"""A roofline-style H100 cost model for a recorded launch sequence (kernel_tools.trace).

Per launch:  time = max(tensor-core FLOPs / TC_PEAK_FLOPS, DRAM bytes / HBM_BYTES_PER_S,
                        L2 bytes / L2_BYTES_PER_S, warp-instructions issued / ISSUE_RATE)
                   / wave_efficiency + LAUNCH_S
- Triton kernels (from their sm_90 SASS, kernel_tools.sass): FLOPs and warp-instructions are the static
  counts outside every loop plus the main loop's counts x its trip count (MAIN_LOOP_TRIPS below,
  from the launch's arguments), x warps x CTAs. In a kernel whose main loop runs the tensor cores,
  the other loops are masked tails and taken as not run (full packed blocks); in an elementwise
  kernel every loop is a pass over the same extent and runs the main loop's trip count. DRAM bytes are the sizes of the kernel's tensor
  arguments (each read or written once: what the interface needs; re-reads are assumed to hit L2);
  L2 bytes are the global loads/stores the SASS issues, 32 lanes x width per warp instruction (a
  broadcast load, every lane the same address, is over-counted: addresses are not known statically). wave_efficiency = (CTAs / SMs) / ceil(CTAs / SMs).
- cuBLAS GEMMs (aten mm/addmm/bmm): 2*M*N*K FLOPs at the measured GEMM rate; bytes = operands.
- Other aten ops (the glue between kernels): inputs + outputs bytes at HBM bandwidth. View ops and
  allocations cost nothing and launch nothing.
Constants: the H100 figures of roberta_kernels/sm90.py (datasheet, and what was measured on an H100 of this
workplace where it exists; the measured matmul rate is the tensor-core roof for cuBLAS and Triton
alike); ISSUE_RATE = SMs x schedulers x clock. The launch gap (LAUNCH_S, between dependent kernels)
is an estimate.
Error band: +-30% per memory-bound kernel, -20%/+50% per latency-bound or small-grid kernel (the
model ignores latency and occupancy effects beyond wave quantisation), +-25% on the summed step.
It is an estimate, never a measurement: `python -m kernel_tools.perf_report --calibrate` on a GPU writes
measured against modelled per kernel (bench_results/sm90_calibration.csv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernel_tools.sass import KernelBinary
from kernel_tools.trace import TensorSpec, TorchOp, TritonLaunch
from roberta_kernels import sm90

ISSUE_RATE = sm90.SM_COUNT * sm90.SCHEDULERS_PER_SM * sm90.CLOCK_HZ  # warp-instructions per second
LAUNCH_S = 2e-6

GEMM_OPS = (
    "aten.mm.",
    "aten.addmm.",
    "aten.addmm_.",
    "aten.bmm.",
    "aten.baddbmm.",
)  # every overload: out=, dtype
FREE = (
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.detach",
    "aten._unsafe_view",
    "aten.lift_fresh",
    "aten.alias",
    "aten.as_strided",
    "aten.set_",
)


def is_gemm(op: TorchOp) -> bool:
    return op.name.startswith(GEMM_OPS)


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# Trip count of each kernel's main loop, from its launch arguments; a kernel not listed runs its main
# loop once (elementwise kernels have none).
MAIN_LOOP_TRIPS = {
    "_attn_fwd_kernel": lambda a: _cdiv(a["S"], a["BLOCK_N"]),
    "_attn_bwd_dkdv_kernel": lambda a: _cdiv(a["S"], a["BLOCK_M"]),
    "_attn_bwd_dq_kernel": lambda a: _cdiv(a["S"], a["BLOCK_N"]),
    "_ln_bwd_kernel": lambda a: _cdiv(a["rows_per_program"], 2),  # two rows an iteration
    "_bias_gelu_bwd_kernel": lambda a: _cdiv(a["rows_per_program"], a["BLOCK_M"]),
    "_ce_kernel": lambda a: _cdiv(a["V_load"], a["BLOCK_V"]),  # each pass over the vocabulary
}


@dataclass
class Cost:
    seconds: float
    bound: str  # which term set the time: tc, dram, l2, issue, launch
    flops: float
    dram_bytes: float
    l2_bytes: float
    instructions: float  # warp-instructions issued
    trips: int = 1


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _tensor_bytes(args: dict) -> int:
    return sum(_nbytes(v.shape, v.dtype) for v in args.values() if isinstance(v, TensorSpec))


def _roof(terms: dict, efficiency: float = 1.0) -> tuple[float, str]:
    bound = max(terms, key=terms.get)
    return terms[bound] / efficiency + LAUNCH_S, bound


def triton_cost(launch: TritonLaunch, binary: KernelBinary) -> Cost:
    trips = int(MAIN_LOOP_TRIPS.get(launch.name, lambda a: 1)(launch.args))
    straight = binary.straight_sass
    # An MMA kernel's other loops are masked tails, with no block left for full packed blocks; an
    # elementwise kernel's loops are passes over the same extent (a row, the vocabulary): all run.
    loop = binary.loop_sass if binary.mma_flops(binary.loop_sass) else binary.all_loop_sass
    warps = launch.ctas * binary.num_warps
    instructions = warps * (len(straight) + len(loop) * trips)
    flops = warps * (binary.mma_flops(straight) + binary.mma_flops(loop) * trips)
    # cp.async outside the loop is the software pipeline's prologue: loads of the loop's own first
    # iterations (whose in-loop copies are predicated off), so it is not counted twice
    prologue_free = [s for s in straight if "LDGSTS" not in s]
    l2_bytes = warps * (binary.global_bytes(prologue_free) + binary.global_bytes(loop) * trips)
    dram = _tensor_bytes(launch.args)
    efficiency = (launch.ctas / sm90.SM_COUNT) / _cdiv(launch.ctas, sm90.SM_COUNT)
    terms = {
        "tc": flops / sm90.TC_PEAK_FLOPS,
        "dram": dram / sm90.HBM_BYTES_PER_S,
        "l2": l2_bytes / sm90.L2_BYTES_PER_S,
        "issue": instructions / ISSUE_RATE,
    }
    seconds, bound = _roof(terms, efficiency)
    return Cost(seconds, bound, flops, dram, l2_bytes, instructions, trips)


def torch_cost(op: TorchOp) -> Cost | None:
    """None for ops that launch nothing (views, allocations)."""
    if op.is_view or op.name.startswith(FREE):
        return None
    dram = sum(_nbytes(s, d) for s, d in op.inputs + op.outputs)
    flops = 0.0
    if is_gemm(op):
        (m, k), n = op.inputs[-2][0][-2:], op.inputs[-1][0][-1]
        batch = math.prod(op.inputs[-2][0][:-2])
        flops = 2.0 * batch * m * n * k
    seconds, bound = _roof({"tc": flops / sm90.TC_PEAK_FLOPS, "dram": dram / sm90.HBM_BYTES_PER_S})
    return Cost(seconds, bound, flops, dram, 0.0, 0.0)

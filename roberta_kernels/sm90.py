"""The sm_90 (H100/H200) hardware facts, in one place: the ops size their tiles by them, the static
report in kernel_tools (trace, sass, cost_model, compile_check, perf_report) checks and models
against them. Figures from NVIDIA's Hopper tuning guide (compute capability 9.0 limits) and the
H100 SXM datasheet; the two measured rates name how they were measured."""

COMPUTE_CAPABILITY = 90
WARP_SIZE = 32
SM_COUNT = 132  # H100 SXM
SHARED_BYTES_PER_CTA = 232448  # 227 KB, the opt-in maximum per block
SHARED_BYTES_PER_SM = 233472  # 228 KB
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SCHEDULERS_PER_SM = 4  # each issues one warp-instruction per clock
CLOCK_HZ = 1.755e9  # boost clock
TC_PEAK_FLOPS = 798e12  # measured: bf16 8192^3 torch.matmul on an H100 of this workplace
DATASHEET_PEAK_BF16_FLOPS = 989e12  # for MFU, as training/metrics.py
HBM_BYTES_PER_S = 3.0e12  # measured device-to-device copy (datasheet: 3.35 TB/s HBM3)
L2_BYTES_PER_S = 5.5e12  # an estimate

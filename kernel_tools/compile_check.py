"""python -m kernel_tools.compile_check: compile every kernel for sm_90 (H100/H200) without a GPU.

Builds each kernel at the block sizes and warps its launcher uses, for every dtype it supports,
with Triton's CUDA backend targeting sm_90, and fails on what would only fail on the GPU: tl.dot
shapes, layouts, shared memory over roberta_kernels.sm90.SHARED_BYTES_PER_CTA. Must run without
TRITON_INTERPRET (tests run it in a subprocess).
"""

import importlib
import os
import sys

import torch
import triton
from triton.compiler import ASTSource

from kernel_tools.trace import SM90
from roberta_kernels import sm90

# roberta_kernels/__init__ re-exports functions under the module names, so take the modules themselves
A, G, C, L = (
    importlib.import_module(f"roberta_kernels.{m}")
    for m in ("attention", "bias_gelu", "cross_entropy", "layer_norm")
)

TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
}


def compile_sm90(jit_fn, values: dict, num_warps: int, num_stages: int = 3):
    jf = jit_fn
    signature, constexprs = {}, {}
    for i, name in enumerate(jf.arg_names):
        v = values[name]
        if i in jf.constexprs or v is None:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.dtype):
            signature[name] = "*" + TYPES[v]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32"
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}={v!r}")
    src = ASTSource(jf, signature, constexprs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=SM90, options=opts)
    if compiled.metadata.shared > sm90.SHARED_BYTES_PER_CTA:
        raise RuntimeError(
            f"{jf.__name__}: {compiled.metadata.shared} B of shared memory > {sm90.SHARED_BYTES_PER_CTA}"
        )
    print(
        f"  ok  {jf.__name__:<24} warps {num_warps} stages {num_stages} shared {compiled.metadata.shared:>6} B"
    )
    return compiled


def ptrs(names, dtype):
    return dict.fromkeys(names, dtype)


ATTN_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def attention_sm90(head_dim, dtype):
    ints = [f"stride_{t}{d}" for t in ("q", "k", "v", "do", "grad") for d in ("b", "s", "h")]
    scalars = {
        **dict.fromkeys([*ints, "stride_mb", "stride_gb", "H", "S"], 7),
        **dict(qk_scale=0.1, sm_scale=0.1, drop_scale=1.1, drop_threshold=26, seed=3),
    }
    flags = dict(HAS_KPM=True, HAS_SEG=True, HAS_DROPOUT=True, IEEE=dtype == torch.float32, HEAD_DIM=head_dim)
    pointers = {
        **ptrs(["Q_ptr", "K_ptr", "V_ptr", "O_ptr", "DO_ptr", "DQ_ptr", "DK_ptr", "DV_ptr"], dtype),
        **ptrs(["LSE_ptr", "Delta_ptr"], torch.float32),
        "KPM_ptr": torch.int8,
        "SEG_ptr": torch.int32,
    }
    for kernel, fn in (
        ("fwd", A._attn_fwd_kernel),
        ("dq", A._attn_bwd_dq_kernel),
        ("dkdv", A._attn_bwd_dkdv_kernel),
    ):
        cfg = A._config(kernel, head_dim, dropout=True)
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        compile_sm90(fn, {**pointers, **scalars, **flags, **blocks}, cfg["num_warps"], cfg["num_stages"])


def layer_norm_sm90(N, dtype):
    block = triton.next_power_of_2(N)
    compile_sm90(
        L._ln_fwd_kernel,
        {
            **ptrs(["X_ptr", "R_ptr", "Y_ptr", "H_ptr"], dtype),
            **ptrs(["W_ptr", "B_ptr"], dtype),
            **ptrs(["Mean_ptr", "Rstd_ptr"], torch.float32),
            "M": 16384,
            "N": N,
            "stride_x_row": N,
            "stride_r_row": N,
            "eps": 1e-5,
            "p": 0.1,
            "threshold": L._threshold(0.1),
            "seed": 1,
            "HAS_RESIDUAL": True,
            "HAS_DROPOUT": True,
            "STORE_H": True,
            "ROWS": 2,
            "BLOCK_N": block,
        },
        L._warps(block),
    )
    compile_sm90(
        L._ln_bwd_kernel,
        {
            **ptrs(["DY_ptr", "H_ptr", "W_ptr", "DH_ptr", "DX_ptr"], dtype),
            **ptrs(["Mean_ptr", "Rstd_ptr", "DW_ptr", "DB_ptr"], torch.float32),
            "M": 16384,
            "N": N,
            "rows_per_program": 31,
            "p": 0.1,
            "threshold": L._threshold(0.1),
            "seed": 1,
            "HAS_DROPOUT": True,
            "BLOCK_N": block,
        },
        L._warps(block),
    )


def pointwise_sm90():
    dt = torch.bfloat16
    blocks = dict(BLOCK_M=G._BLOCK_M, BLOCK_N=G._BLOCK_N)
    compile_sm90(
        G._bias_gelu_fwd_kernel,
        {
            **ptrs(["X_ptr", "B_ptr", "Y_ptr"], dt),
            "M": 9,
            "N": 3072,
            "stride_x_row": 3072,
            "stride_y_row": 3072,
            **blocks,
        },
        4,
    )
    compile_sm90(
        G._bias_gelu_bwd_kernel,
        {
            **ptrs(["DY_ptr", "X_ptr", "B_ptr", "DX_ptr"], dt),
            "DB_ptr": torch.float32,
            "M": 16384,
            "N": 3072,
            "stride_x_row": 3072,
            "rows_per_program": 384,
            **blocks,
        },
        4,
    )
    LCE = importlib.import_module("roberta_kernels.linear_cross_entropy")
    va = 50240  # the fused head: V = 50265 as 50240 aligned columns + a contiguous tail of 25
    for stats, grad, tail, v_load in (
        (True, True, dt, va),
        (True, False, None, 50265),
        (False, True, None, 50265),
    ):
        compile_sm90(
            C._ce_kernel,
            {
                "Logits_ptr": dt,
                "Tail_ptr": tail,
                "Labels_ptr": torch.int64,
                **ptrs(["Loss_ptr", "LSE_ptr"], torch.float32),
                "Hit_ptr": torch.int32,
                "DLogits_ptr": dt,
                "Scale_ptr": None if stats else torch.float32,
                "Ok_ptr": torch.int32,
                "scale": 1.0,
                "V": 50265,
                "V_load": v_load,
                "stride_row": v_load,
                "stride_drow": v_load,
                "ignore_index": -100,
                "STATS": stats,
                "GRAD": grad,
                "BLOCK_V": C._block_v(v_load),
                "BLOCK_T": 32 if tail is not None else 1,
            },
            8,
        )
    compile_sm90(
        LCE._scale_cast_kernel,
        {
            "X_ptr": dt,
            "Y_ptr": dt,
            "Scale_ptr": torch.float32,
            "M": 50265,
            "N": 768,
            "stride_x_row": 776,
            "BLOCK_M": 4,
            "BLOCK_N": 1024,
        },
        4,
    )


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "compile_check: unset TRITON_INTERPRET (it must be unset before kernels are imported)",
            file=sys.stderr,
        )
        return 2
    print(f"compiling for sm_90 with triton {triton.__version__}")
    for head_dim in (64, 128):
        for dtype in ATTN_DTYPES:
            print(f"attention head_dim {head_dim} {dtype}")
            attention_sm90(head_dim, dtype)
    for n in (768, 1024):
        for dtype in (torch.bfloat16, torch.float16):
            print(f"layer_norm N {n} {dtype}")
            layer_norm_sm90(n, dtype)
    print("bias_gelu, cross_entropy, linear_cross_entropy bf16")
    pointwise_sm90()
    print("compile_check: all kernels compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())

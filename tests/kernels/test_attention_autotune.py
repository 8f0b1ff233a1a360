"""The attention autotuning space fits sm_90: every config of every kernel, head dim and dropout flag,
compiled for sm_90 as the launchers launch it (kernel_tools.trace on meta tensors), passes the static
report's check (no spills, wgmma, shared memory and one CTA fit), and the shared-memory estimate that
prunes the space is an upper bound. Run as a script (no TRITON_INTERPRET) it prints one JSON row per
compiled config. Correctness of every config: test_attention.py::test_every_autotune_config_in_fp32."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
B, S, H = 2, 512, 12  # the base preset at seq 512 (the grid does not change the binary)


def compile_space() -> list[dict]:
    """One report row per (kernel, head dim, dtype space, dropout, config), compiled with a key padding
    mask and document ids (the variant with the most registers)."""
    from kernel_tools import perf_report, sass, trace

    trace.check_not_interpreted()
    A = importlib.import_module("roberta_kernels.attention")
    rows = []
    dtype = torch.bfloat16  # fp16 shares the space (same tiles and sizes); fp32 is not tuned
    for kernel, jit_fn in A.KERNELS.items():
        for D in A.HEAD_DIMS:
            for dropout in (False, True):
                for cfg in A.autotune_space(kernel, D, dtype, dropout):
                    launch = _trace_one(A, kernel, cfg, D, dtype, dropout)
                    assert launch.name == jit_fn.__name__ and launch.num_warps == cfg.num_warps
                    b = sass.inspect_kernel(launch.kernel, launch.name)
                    rows.append(
                        dict(
                            kernel=launch.name, variant=f"kpm+seg{'+dropout' if dropout else ''} {cfg}",
                            preset=f"d{D}", seq_len=S, spill_bytes=b.spill_bytes, wgmma=b.wgmma,
                            mma_sync=b.mma_sync, smem_bytes=b.smem_bytes, ctas_per_sm=b.ctas_per_sm,
                            regs=b.regs, num_warps=b.num_warps, loop_sass=b.loop_instructions,
                            estimate=A.smem_estimate(kernel, cfg, D, dtype.itemsize, dropout),
                            default=cfg == A.default_config(kernel, D, dropout),
                        )
                    )  # fmt: skip
                    rows[-1]["problems"] = perf_report.check([rows[-1]])
    return rows


def _trace_one(A, kernel, cfg, D, dtype, dropout):
    from kernel_tools import trace

    qkv = torch.empty(B, S, 3, H, D, dtype=dtype, device="meta")  # q, k, v: views, as the model passes them
    q, k, v = qkv.unbind(2)
    kpm = torch.empty(B, S, dtype=torch.int8, device="meta")
    seg = torch.empty(B, S, dtype=torch.int32, device="meta")
    p = 0.1 if dropout else 0.0
    with trace.trace_launches() as events:
        if kernel == "fwd":
            A.attention_fwd(q, k, v, kpm, seg, D**-0.5, p, 1, config=cfg)
        else:
            o = torch.empty(B, S, H, D, dtype=dtype, device="meta")
            lse = torch.empty(B, H, S, dtype=torch.float32, device="meta")
            A.attention_bwd(o, q, k, v, o, lse, kpm, seg, D**-0.5, p, 1, **{f"{kernel}_config": cfg})
    return next(
        e for e in events if isinstance(e, trace.TritonLaunch) and e.name == A.KERNELS[kernel].__name__
    )


@pytest.mark.slow
def test_every_autotune_config_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    A = importlib.import_module("roberta_kernels.attention")
    expected = sum(
        len(A.autotune_space(k, D, torch.bfloat16, p))
        for k in A.KERNELS
        for D in A.HEAD_DIMS
        for p in (False, True)
    )
    assert len(rows) == expected
    problems = [p for r in rows for p in r["problems"]]
    assert problems == [], "\n".join(problems)
    # the estimate that prunes the candidates bounds what they use (the default is never pruned)
    under = [r for r in rows if not r["default"] and r["estimate"] < r["smem_bytes"]]
    assert under == [], under
    for k in A.KERNELS:  # something to choose from, and fp32 (no tensor cores) is not tuned
        assert len(A.autotune_space(k, 64, torch.bfloat16, False)) > 1
        assert A.autotune_space(k, 64, torch.float32, False) == [A.default_config(k, 64, False)]


if __name__ == "__main__":
    for row in compile_space():
        print(json.dumps(row), flush=True)

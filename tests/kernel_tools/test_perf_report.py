"""The static sm_90 report: its SASS reading, its check (shown able to fail on deliberately bad
kernels), and the report itself on the model's real launches (what CI runs)."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernel_tools.sass import KernelBinary, _innermost_loops, _local_bytes, _main_loop

ROOT = Path(__file__).resolve().parents[2]


def _compile_env():
    # sm_90 compiles run without the interpreter, in a subprocess (TRITON_INTERPRET is read at import)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_sass_loops_spills_and_mma_are_read_from_the_listing():
    listing = [
        (0x00, "LDC R1, c[0x0][0x28]"),
        (0x10, "STL.64 [R1], R2"),
        (0x20, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT"),  # loop A starts (outer)
        (0x30, "IADD3 R4, R4, 0x1, RZ"),  # loop B starts (inner, the main loop)
        (0x40, "HMMA.16816.F32.BF16 R8, R12, R16, R8"),
        (0x50, "LDG.E.128 R20, desc[UR6][R2.64]"),
        (0x60, "@P0 BRA 0x30"),
        (0x70, "LDL R5, [R1+0x8]"),
        (0x80, "@P1 BRA 0x20"),
        (0x90, "EXIT"),
        (0xA0, "BRA 0xa0"),  # the trailing self-branch is no loop
    ]
    addrs, sass = [a for a, _ in listing], [s for _, s in listing]
    loops = _innermost_loops(addrs, sass)
    loop = _main_loop(sass, loops)
    assert loops == [loop] and (loop.start, loop.end, loop.size) == (3, 6, 4)
    assert _local_bytes(sass, "STL") == 8 and _local_bytes(sass, "LDL") == 4
    b = KernelBinary("k", 4, 128, 0, 1024, 8, 4, sass, loop, loops)
    assert len(b.straight_sass) == len(sass) - 4
    assert (b.wgmma, b.mma_sync, b.loop_instructions) == (1, 1, 4)
    # one warp: a quarter of a 64x64x16 warpgroup MMA; a whole 16x8x16 MMA
    assert b.mma_flops(b.loop_sass) == 2 * 16 * 8 * 16
    assert b.mma_flops(sass) == 2 * 64 * 64 * 16 // 4 + 2 * 16 * 8 * 16
    assert b.global_bytes(b.loop_sass) == 32 * 16
    assert b.ctas_per_sm == 4  # 128 regs x 4 warps: 16K of 64K registers


BAD_KERNELS = textwrap.dedent(
    """
    import json, sys
    import torch
    import triton
    import triton.language as tl
    from kernel_tools import perf_report, sass, trace, cost_model

    @triton.jit
    def _square_kernel(X_ptr, Y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(X_ptr + offs[:, None] * BLOCK + offs[None, :])
        b = tl.load(X_ptr + offs[None, :] * BLOCK + offs[:, None])
        tl.store(Y_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))

    variants = {
        "good": dict(BLOCK=64, num_warps=4),
        "spills": dict(BLOCK=128, num_warps=4, maxnreg=96),
        "mma_sync": dict(BLOCK=64, num_warps=2),
        "smem": dict(BLOCK=512, num_warps=8, num_stages=1),
    }
    verdict = {}
    for name, kw in variants.items():
        n = kw["BLOCK"]
        x = torch.empty(n, n, dtype=torch.bfloat16, device="meta")
        y = torch.empty(n, n, dtype=torch.float32, device="meta")
        with trace.trace_launches() as events:
            _square_kernel[(1,)](x, y, **kw)
        (launch,) = events
        b = sass.inspect_kernel(launch.kernel, launch.name)
        row = dict(kernel=name, variant="plain", preset="-", seq_len=0, spill_bytes=b.spill_bytes,
                   wgmma=b.wgmma, mma_sync=b.mma_sync, smem_bytes=b.smem_bytes, ctas_per_sm=b.ctas_per_sm,
                   regs=b.regs, num_warps=b.num_warps)
        verdict[name] = perf_report.check([row])
    print(json.dumps(verdict))
    """
)


@pytest.mark.slow
def test_check_fails_on_spilling_mma_sync_and_oversized_kernels(tmp_path):
    script = tmp_path / "bad_kernels.py"
    script.write_text(BAD_KERNELS)
    res = subprocess.run(
        [sys.executable, str(script)], env=_compile_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    verdict = json.loads(res.stdout.strip().splitlines()[-1])
    assert verdict["good"] == []
    assert any("spills" in p for p in verdict["spills"]), verdict
    assert any("mma.sync" in p for p in verdict["mma_sync"]), verdict
    assert any("shared memory" in p for p in verdict["smem"]), verdict


@pytest.mark.slow
def test_report_on_the_models_launches_passes_its_check(tmp_path):
    """What CI runs: every hot kernel of base and large, seq 128 and 512, with and without dropout and
    document mask, compiled as launched; the check fails on spills, mma.sync or shared memory."""
    res = subprocess.run(
        [sys.executable, "-m", "kernel_tools.perf_report", "--check", "--out", str(tmp_path)],
        cwd=ROOT,
        env=_compile_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(res.stdout[-6000:])  # the per-kernel difference against the committed report, in the CI log
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    with open(tmp_path / "sm90_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel", "_bias_gelu_fwd_kernel"} <= kernels
    assert {(r["preset"], r["seq_len"]) for r in rows} == {
        ("base", "128"),
        ("base", "512"),
        ("large", "128"),
        ("large", "512"),
    }
    attn = [
        r
        for r in rows
        if r["kernel"] == "_attn_fwd_kernel" and r["preset"] == "base" and r["seq_len"] == "512"
    ]
    assert {r["variant"] for r in attn} >= {"kpm", "kpm+dropout", "kpm+seg", "kpm+seg+dropout"}
    assert all(int(r["wgmma"]) > 0 and int(r["loop_sass"]) > 0 for r in attn)
    steps = json.loads(next(tmp_path.glob("sm90_steps_triton*.json")).read_text())
    assert len(steps) == 16 and all(s["modelled_ms"] > 0 and 0 < s["mfu"] < 1 for s in steps)


def test_before_after_table_is_rendered_from_the_step_files(tmp_path):
    """sm90_before_after.md: the recipe's step in the BEFORE report and now, one pair of rows per triton
    version that both hold, with the commit the report's CSV records (38.15 ms is 38.2, half up)."""
    from kernel_tools import perf_report

    out = tmp_path / "bench_results"
    (out / perf_report.BEFORE).mkdir(parents=True)
    assert perf_report.before_after(out, "base s512 p0.1") is None  # no step files yet

    def step(ms, mfu, moved, launches):
        recipe = {"config": "base s512 p0.1", "micro_batch": 32, "modelled_ms": ms, "mfu": mfu}
        recipe.update(moved_gb=moved, min_gb=32.77, launches_per_layer=launches)
        return json.dumps([{"config": "base s128 p0", "modelled_ms": 1.0}, recipe])

    (out / perf_report.BEFORE / "sm90_steps_triton3.6.0.json").write_text(step(38.15, 0.261, 65.08, 97.1))
    (out / "sm90_steps_triton3.6.0.json").write_text(step(21.55, 0.462, 37.13, 43.8))
    (out / "sm90_steps_triton3.9.0.json").write_text(step(21.24, 0.469, 37.15, 43.9))  # no before: left out
    (out / "sm90_report.csv").write_text("kernel,triton,commit\n_k,3.9.0,bbbbbbb\n_k,3.6.0,aaaaaaa\n")
    assert perf_report.main(["--tables-only", "--out", str(out)]) == 0
    head, table = (out / "sm90_before_after.md").read_text().split("\n\n")
    assert "H100" in head and "micro-batch 32" in head and "3.6.0 at aaaaaaa" in head and "3.9" not in head
    assert "`bench_results/sm90_8726330/`" in head
    assert table.splitlines()[2:] == [
        "| 3.6.0 | before | 38.2 ms | 26% | 65.1 (32.8) | 97.1 |",
        "| 3.6.0 | after | 21.6 ms | 46% | 37.1 (32.8) | 43.8 |",
    ]

"""python -m kernel_tools.bench: each fused kernel against what users would pick instead.

For every kernel, forward, backward and forward+backward at the shapes of the `base` and `large`
presets (seq 128 and 512, ~16K tokens per batch), timed with triton.testing.do_bench (median and
20/80% quantiles), against torch eager, torch.compile and, for attention, every SDPA backend this
machine has (flash, cuDNN, efficient). Prints a table (ms, TFLOP/s or GB/s, speed-up over eager),
appends rows (device, versions, commit) to a CSV and draws a PNG per kernel.
linear_cross_entropy computes its gradients during the forward (so that the logits can be freed):
compare it on fwd+bwd. peak_extra_mib is the peak memory above what was allocated before the call.
--smoke runs the same code on CPU (Triton interpreter, tiny shapes, wall-clock timing): it checks
the script, not the speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

PRESETS = {"base": (768, 12, 3072), "large": (1024, 16, 4096)}  # hidden, heads, intermediate
VOCAB = 50265


def _timer(smoke: bool):
    if smoke:

        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms, ms

        return bench
    import triton.testing

    return lambda fn: tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100))


def _modes(fwd: Callable, inputs: list[torch.Tensor]) -> dict[str, Callable]:
    """fwd / bwd / fwd+bwd closures for a function of `inputs` (which require grad)."""
    out = fwd()
    grad = torch.randn_like(out) if out.ndim else torch.ones_like(out)

    def bwd_only():
        for t in inputs:
            t.grad = None
        out.backward(grad, retain_graph=True)

    def both():
        for t in inputs:
            t.grad = None
        fwd().backward(grad)

    return {"fwd": fwd, "bwd": bwd_only, "fwd+bwd": both}


def attention_cases(B, S, H, D, dtype, device, pad_frac):
    from roberta_kernels import attention_qkvpacked, attention_ref

    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    kpm = torch.ones(B, S, dtype=torch.bool, device=device)
    lengths = (
        (S * (1 - pad_frac * torch.rand(B, generator=torch.Generator().manual_seed(0)) * 2))
        .long()
        .clamp(1, S)
    )
    for b, n in enumerate(lengths.tolist()):
        kpm[b, n:] = False
    q, k, v = qkv.unbind(2)
    cases = {
        "triton": lambda: attention_qkvpacked(qkv, key_padding_mask=kpm),
        "triton-dropout0.1": lambda: attention_qkvpacked(qkv, key_padding_mask=kpm, dropout_p=0.1),
        "eager": lambda: attention_ref(q, k, v, kpm),
    }
    _attention_tuning(cases, qkv, D, dtype, device)
    bias = torch.zeros(B, 1, 1, S, device=device, dtype=dtype).masked_fill(~kpm[:, None, None], float("-inf"))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        # flash has no mask argument: it runs unpadded-equivalent dense attention (a lower bound)
        mask = None if backend == SDPBackend.FLASH_ATTENTION else bias

        def run(backend=backend, mask=mask):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

        cases[name] = run
    # 4 * B * H * S^2 * D FLOPs forward (QK^T and PV), 2.5x that backward
    flops = {"fwd": 4 * B * H * S * S * D}
    flops["bwd"], flops["fwd+bwd"] = 2.5 * flops["fwd"], 3.5 * flops["fwd"]
    return cases, [qkv], flops, None


def _attention_tuning(cases, qkv, D, dtype, device):
    """Print each attention kernel's autotuning space and, on CUDA, the config it picked (one forward +
    backward of each Triton case tunes it before the timed runs)."""
    import importlib

    A = importlib.import_module("roberta_kernels.attention")
    tiles = lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"  # noqa: E731
    for name in ("triton", "triton-dropout0.1"):
        dropout = name != "triton"
        for kernel in A.KERNELS:
            space = A.autotune_space(kernel, D, dtype, dropout)
            print(f"attention {kernel} d{D} {dtype} dropout={dropout}: space {', '.join(map(tiles, space))}")
        if device != "cuda":
            continue
        cases[name]().backward(torch.ones(qkv.shape[:2] + qkv.shape[3:], device=device, dtype=dtype))
        qkv.grad = None
        for kernel in A.KERNELS:
            for key, cfg in A.tuned_configs(kernel).items():
                if key[1] == D and key[4] == dropout:
                    print(f"attention {kernel} key {key}: winner {tiles(cfg)}")


def layer_norm_cases(M, N, dtype, device):
    from roberta_kernels import layer_norm, layer_norm_ref

    x, r = (torch.randn(M, N, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(N, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    cases = {
        "triton": lambda: layer_norm(x, w, b, residual=r, dropout_p=0.1),
        "eager": lambda: layer_norm_ref(x, w, b, residual=r, dropout_p=0.1),
    }
    compiled = torch.compile(layer_norm_ref)
    cases["compile"] = lambda: compiled(x, w, b, residual=r, dropout_p=0.1)
    e = torch.finfo(dtype).bits // 8
    # minimum bytes: fwd reads x, r, writes y (+ h for the backward); bwd reads dy, h, writes dx, dr
    nbytes = {"fwd": 4 * M * N * e, "bwd": 4 * M * N * e}
    nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
    return cases, [x, r, w, b], None, nbytes


def bias_gelu_cases(M, N, dtype, device):
    from roberta_kernels import bias_gelu, bias_gelu_ref

    x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(bias_gelu_ref)
    cases = {
        "triton": lambda: bias_gelu(x, b),
        "eager": lambda: bias_gelu_ref(x, b),
        "compile": lambda: compiled(x, b),
    }
    e = torch.finfo(dtype).bits // 8
    nbytes = {"fwd": 2 * M * N * e, "bwd": 3 * M * N * e, "fwd+bwd": 5 * M * N * e}
    return cases, [x, b], None, nbytes


def cross_entropy_cases(N, V, dtype, device):
    from roberta_kernels import cross_entropy, cross_entropy_ref

    logits = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (N,), device=device)
    compiled = torch.compile(cross_entropy_ref)
    cases = {
        "triton": lambda: cross_entropy(logits, labels),
        "eager": lambda: cross_entropy_ref(logits, labels),
        "compile": lambda: compiled(logits, labels),
    }
    e = torch.finfo(dtype).bits // 8
    nbytes = {"fwd": N * V * e, "bwd": 2 * N * V * e, "fwd+bwd": 3 * N * V * e}
    return cases, [logits], None, nbytes


def linear_cross_entropy_cases(N, D, V, dtype, device):
    from roberta_kernels import linear_cross_entropy, linear_cross_entropy_ref

    h = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(V, D, device=device, dtype=dtype)).requires_grad_()
    b = torch.zeros(V, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (N,), device=device)
    compiled = torch.compile(lambda *a: linear_cross_entropy_ref(*a)[0])
    cases = {
        "triton-fused": lambda: linear_cross_entropy(h, w, b, labels)[0],
        "eager": lambda: linear_cross_entropy_ref(h, w, b, labels)[0],  # full (N, V) logits + F.cross_entropy
        "compile": lambda: compiled(h, w, b, labels),
    }
    flops = {"fwd": 2 * N * D * V, "bwd": 4 * N * D * V, "fwd+bwd": 6 * N * D * V}
    return cases, [h, w, b], flops, None


def shapes(smoke: bool):
    """(kernel, label, builder) at the presets' shapes: ~16K tokens per batch, seq 128 and 512."""
    if smoke:
        yield "attention", "B2 S64 H2 D64", lambda dt, dev: attention_cases(2, 64, 2, 64, dt, dev, 0.1)
        yield "layer_norm", "M64 N768", lambda dt, dev: layer_norm_cases(64, 768, dt, dev)
        yield "bias_gelu", "M32 N3072", lambda dt, dev: bias_gelu_cases(32, 3072, dt, dev)
        yield "cross_entropy", "N16 V4096", lambda dt, dev: cross_entropy_cases(16, 4096, dt, dev)
        yield (
            "linear_cross_entropy",
            "N64 D64 V4096",
            lambda dt, dev: linear_cross_entropy_cases(64, 64, 4096, dt, dev),
        )
        return
    tokens = 16384
    for preset, (D, H, F_) in PRESETS.items():
        for S in (128, 512):
            B = tokens // S
            yield (
                "attention",
                f"{preset} B{B} S{S} H{H} D{D // H} pad10%",
                lambda dt, dev, B=B, S=S, H=H, D=D: attention_cases(B, S, H, D // H, dt, dev, 0.1),
            )
        yield (
            "layer_norm",
            f"{preset} M{tokens} N{D}",
            lambda dt, dev, D=D: layer_norm_cases(tokens, D, dt, dev),
        )
        yield (
            "bias_gelu",
            f"{preset} M{tokens} N{F_}",
            lambda dt, dev, F_=F_: bias_gelu_cases(tokens, F_, dt, dev),
        )
    yield (
        "cross_entropy",
        f"N{int(tokens * 0.15)} V{VOCAB}",
        lambda dt, dev: cross_entropy_cases(int(tokens * 0.15), VOCAB, dt, dev),
    )
    for preset, (D, _, _) in PRESETS.items():  # the MLM head: 15% of 16K tokens through the tied decoder
        yield (
            "linear_cross_entropy",
            f"{preset} N{int(tokens * 0.15)} D{D} V{VOCAB}",
            lambda dt, dev, D=D: linear_cross_entropy_cases(int(tokens * 0.15), D, VOCAB, dt, dev),
        )


def run(args) -> list[dict]:
    from roberta_ds.benchmarks.common import append_csv, env_info, print_table

    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    bench, info, rows = _timer(args.smoke), env_info(), []
    only = set(args.kernels.split(",")) if args.kernels else None
    for kernel, label, build in shapes(args.smoke):
        if only and kernel not in only:
            continue
        cases, inputs, flops, nbytes = build(dtype, device)
        for impl, fn in cases.items():
            if args.smoke and impl not in ("triton", "triton-fused", "eager"):
                continue  # torch.compile / SDPA backends need a GPU worth timing
            try:
                modes = _modes(fn, inputs)
            except RuntimeError as e:  # e.g. an SDPA backend not built for this device
                print(f"skip {kernel} {impl}: {str(e).splitlines()[0]}")
                continue
            for mode, f in modes.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base_mem = torch.cuda.memory_allocated()
                ms, lo, hi = bench(f)
                peak_mib = (
                    (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if device == "cuda" else None
                )
                row = {
                    "bench": "kernel",
                    **info,
                    "kernel": kernel,
                    "shape": label,
                    "dtype": args.dtype,
                    "impl": impl,
                    "mode": mode,
                    "ms": ms,
                    "ms_p20": lo,
                    "ms_p80": hi,
                    "peak_extra_mib": peak_mib,
                }
                if flops:
                    row["tflops"] = flops[mode] / ms / 1e9
                if nbytes:
                    row["gbps"] = nbytes[mode] / ms / 1e6
                rows.append(row)
        for r in rows:
            if r["kernel"] == kernel and r["shape"] == label:
                eager = next(
                    x["ms"]
                    for x in rows
                    if x["kernel"] == kernel
                    and x["shape"] == label
                    and x["impl"] == "eager"
                    and x["mode"] == r["mode"]
                )
                r["speedup_vs_eager"] = eager / r["ms"]
    print(
        f"kernels, {info['device']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}, "
        f"{args.dtype}{' (smoke: CPU interpreter, timings meaningless)' if args.smoke else ''}"
    )
    print_table(
        rows,
        ["kernel", "shape", "impl", "mode", "ms", "tflops", "gbps", "speedup_vs_eager", "peak_extra_mib"],
    )
    append_csv(args.csv, rows)
    if args.plot_dir:
        plot(rows, Path(args.plot_dir))
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        sel = [r for r in rows if r["kernel"] == kernel and r["mode"] == "fwd+bwd"]
        labels = list(dict.fromkeys(r["shape"] for r in sel))
        impls = list(dict.fromkeys(r["impl"] for r in sel))
        fig, ax = plt.subplots(figsize=(2 + 2 * len(labels), 4))
        w = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = [next((r["ms"] for r in sel if r["impl"] == impl and r["shape"] == s), 0) for s in labels]
            ax.bar([i + j * w for i in range(len(labels))], vals, w, label=impl)
        ax.set_xticks([i + w * (len(impls) - 1) / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("ms (forward + backward, lower is better)")
        ax.set_title(f"{kernel}, {rows[0]['device']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{kernel}.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kernel_tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument(
        "--kernels", default="", help="comma-separated subset: attention,layer_norm,bias_gelu,cross_entropy"
    )
    ap.add_argument("--csv", default="bench_results/kernels.csv")
    ap.add_argument("--plot-dir", default="bench_results")
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (tests the script)"
    )
    args = ap.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel_tools.bench --smoke: run with TRITON_INTERPRET=1 set", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print(
            "kernel_tools.bench: needs a CUDA GPU (timings come from triton.testing.do_bench); --smoke exercises "
            "the script on CPU",
            file=sys.stderr,
        )
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ZeRO stages 1/2/3 modelled: bytes per collective, memory per rank and step time from 8 to 512 GPUs.

Communication (per optimizer step, P parameters, c bytes per element of the 16-bit or fp32 working
dtype, N data-parallel ranks, A micro-batches accumulated), as DeepSpeed 0.19 implements each stage
(checked against its comms logger by `python -m roberta_ds.bench comms` and tests/test_scaling.py):
- ZeRO-1: gradients all-reduced once, at the accumulation boundary (stage_1_and_2.py's
  average_tensor all-reduces whole buckets, use_multi_rank_bucket_allreduce; it is no reduce-scatter);
  after the step the updated parameters are all-gathered (all_gather_dp_groups).
- ZeRO-2: the same, but gradients are all-reduced after every micro-batch (they are partitioned).
- ZeRO-3: parameters all-gathered once per micro-batch for the forward; the backward reuses them when
  the model fits stage3_max_live_parameters and stage3_max_reuse_distance (the shipped configs: 1e9),
  else they are gathered again. Parameters at or under stage3_param_persistence_threshold stay
  gathered and are re-gathered once per step; gradients reduce-scattered after every micro-batch.
Wire bytes per rank (ring): all-gather and reduce-scatter (N-1)/N of the full tensor, all-reduce twice.

Memory per rank: parameters, gradients, optimizer states (fp32 master + Adam moments), activations of
one micro-batch: 34 bytes per token and hidden unit per layer in 16-bit (Korthikanti et al. 2022,
"Reducing Activation Recomputation", eq. 2, without the 5as/h attention-score term that FlashAttention
never stores), or with per-layer checkpointing each layer's 16-bit input plus one layer recomputed.

Step time: compute of one micro-batch (forward + backward) from the static report
(bench_results/sm90_steps_triton*.json, `modelled_ms`), else the model FLOPs at 45% of the H100's
989 TFLOP/s (the MFU target); links: 450 GB/s per GPU inside a node of 8, 50 GB/s per GPU across
nodes; with overlap_comm, gradient traffic hides behind the backward (2/3 of compute) and ZeRO-3's
all-gathers behind the forward and backward; what does not fit shows up in the step time.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

from roberta_ds.benchmarks import doc_tables

ROOT = Path(__file__).resolve().parents[2]
GPUS_PER_NODE = 8
INTRA_NODE_BPS = 450e9  # bytes/s per GPU, NVLink (H100 SXM: 900 GB/s bidirectional)
INTER_NODE_BPS = 50e9  # bytes/s per GPU, 400 Gb/s InfiniBand per GPU
H100_BF16_FLOPS = 989e12  # dense
FALLBACK_MFU = 0.45  # the end-to-end target, used when no static report is at hand
HBM_BPS = 3.35e12  # H100 SXM: the optimizer step is memory-bound
# ZeRO-3 fetches each module's parameters from Python hooks before its forward and backward; that
# host time sits on the critical path. An assumption, not a measurement: the GPU suite's e2e_zero1
# against e2e_zero3 on one GPU (no traffic) measures it; users report ZeRO-3 several times slower than
# ZeRO-1/2 on BERT-sized models (deepspeedai/DeepSpeed#1174, #5047).
ZERO3_FETCH_OVERHEAD_S = 50e-6  # per module with parameters, per forward and per backward
ACT_BYTES_PER_SBH = 34  # 16-bit, per layer (Korthikanti et al. 2022, flash attention)
OPS = ("all_gather", "reduce_scatter", "all_reduce")


def add_args(p) -> None:
    p.add_argument("--presets", default="base,large")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--gpus", default="8,16,32,64,128,256,512")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ds-configs", default="ds_configs/zero{stage}_bf16.json", help="{stage} is filled in")
    p.add_argument(
        "--report-dir", default=str(ROOT / "bench_results"), help="where sm90_steps_triton*.json is"
    )
    p.add_argument(
        "--csv", default="bench_results/scaling.csv", help="rows appended, the .md beside it rewritten"
    )
    p.add_argument("--plot", default="bench_results/scaling.png")
    p.add_argument(
        "--tables-only", action="store_true", help="only rewrite the .md from the CSV's latest run (no model)"
    )


@functools.cache
def _shape(cfg_items: tuple) -> tuple[tuple[int, ...], int]:
    import torch

    from roberta_ds.config import ModelConfig
    from roberta_ds.model import RobertaMLM

    with torch.device("meta"):
        model = RobertaMLM(ModelConfig(**dict(cfg_items)))
    modules = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    return tuple(p.numel() for p in model.parameters()), modules


def param_numels(cfg) -> list[int]:
    """Element count of every parameter of RobertaMLM(cfg), built on the meta device (no memory)."""
    return list(_shape(tuple(asdict(cfg).items()))[0])


def modules_with_params(cfg) -> int:
    """How many modules ZeRO-3 fetches and releases one by one (each has its own hooks)."""
    return _shape(tuple(asdict(cfg).items()))[1]


def _zero(ds_cfg: dict) -> dict:
    return ds_cfg.get("zero_optimization", {})


def elem_bytes(ds_cfg: dict) -> int:
    from roberta_ds.training.ds_config import precision

    return 4 if precision(ds_cfg) == "fp32" else 2


def comms_per_step(cfg, ds_cfg: dict, world: int, grad_accum: int = 1) -> dict[str, float]:
    """Bytes of the full (gathered / unreduced) tensors per optimizer step, per collective."""
    z, c, numels = _zero(ds_cfg), elem_bytes(ds_cfg), param_numels(cfg)
    stage = int(z.get("stage", 0))
    P = sum(numels)
    out = dict.fromkeys(OPS, 0.0)
    if stage in (0, 1, 2):
        out["all_reduce"] = P * c * (grad_accum if stage == 2 else 1)
        out["all_gather"] = P * c if stage else 0.0
    elif stage == 3:
        persist = z.get("stage3_param_persistence_threshold", 100_000)
        padded = [math.ceil(n / world) * world for n in numels]  # each parameter split evenly
        p_persist = sum(p for n, p in zip(numels, padded) if n <= persist)
        p_other = sum(padded) - p_persist
        keep = min(z.get("stage3_max_live_parameters", 10**9), z.get("stage3_max_reuse_distance", 10**9))
        gathers = 1 if keep >= P else 2  # forward, and again for the backward unless kept
        out["all_gather"] = p_other * c * gathers * grad_accum + p_persist * c
        out["reduce_scatter"] = sum(padded) * c * grad_accum
    return out


def logged_bytes_per_step(full: dict[str, float], world: int) -> dict[str, float]:
    """What DeepSpeed's comms logger records: the `tensor` argument of each call, i.e. the input
    shard of an all-gather (none at all on one rank), the whole input of the others."""
    return {
        "all_gather_into_tensor": full["all_gather"] / world if world > 1 else 0.0,
        "reduce_scatter_tensor": full["reduce_scatter"],
        "all_reduce": full["all_reduce"],
    }


def wire_bytes(full: dict[str, float], world: int) -> float:
    """Bytes each rank sends per step over ring collectives."""
    f = (world - 1) / world
    return f * (full["all_gather"] + full["reduce_scatter"] + 2 * full["all_reduce"])


@dataclass
class Memory:  # bytes per rank
    params: float  # resident, plus (ZeRO-3) what is gathered at the peak
    grads: float
    optimizer: float  # fp32 master (mixed precision) + Adam moments
    activations: float
    activations_ckpt: float

    def total(self, checkpointing: bool) -> float:
        act = self.activations_ckpt if checkpointing else self.activations
        return self.params + self.grads + self.optimizer + act


def memory_per_rank(cfg, ds_cfg: dict, world: int, micro_batch: int, seq_len: int) -> Memory:
    z, c = _zero(ds_cfg), elem_bytes(ds_cfg)
    stage, P = int(z.get("stage", 0)), sum(param_numels(cfg))
    mixed = c == 2
    shard = world if stage >= 1 else 1
    if stage == 3:
        live = min(P, z.get("stage3_max_live_parameters", 10**9))
        params = P * c / world + live * c
    else:
        params = P * c
    bucket = z.get("reduce_bucket_size", 5 * 10**8) * c
    grads = (P * c if stage <= 1 else min(bucket, P * c) + P * c / world) + (P * 4 / shard if mixed else 0)
    optimizer = (P * 4 * (3 if mixed else 2)) / shard
    sbh = seq_len * micro_batch * cfg.hidden_size
    per_layer = ACT_BYTES_PER_SBH * sbh * c / 2
    act = cfg.num_layers * per_layer
    act_ckpt = cfg.num_layers * sbh * c + per_layer  # layer inputs + one layer recomputed
    return Memory(params, grads, optimizer, act, act_ckpt)


def compute_ms(preset: str, cfg, seq_len: int, micro_batch: int, report_dir: Path) -> tuple[float, str]:
    """Forward + backward of one micro-batch on an H100: the static report's, else a FLOP estimate."""
    from roberta_ds.model.roberta import flops_per_token

    label = f"{preset} s{seq_len} p0.1"
    for path in sorted(report_dir.glob("sm90_steps_triton*.json"), reverse=True):
        for row in json.loads(path.read_text()):
            if row.get("config", row.get("label")) == label and "modelled_ms" in row:
                mb = row.get("micro_batch", micro_batch)
                return row["modelled_ms"] * micro_batch / mb, path.name
    flops = flops_per_token(cfg, seq_len) * seq_len * micro_batch
    return flops / (H100_BF16_FLOPS * FALLBACK_MFU) * 1e3, f"FLOPs at {FALLBACK_MFU:.0%} MFU"


def step_time(cfg, ds_cfg: dict, world: int, compute_micro_ms: float, grad_accum: int) -> dict:
    z = _zero(ds_cfg)
    stage, overlap = int(z.get("stage", 0)), bool(z.get("overlap_comm", False))
    full = comms_per_step(cfg, ds_cfg, world, grad_accum)
    f = (world - 1) / world
    bw = INTRA_NODE_BPS if world <= GPUS_PER_NODE else INTER_NODE_BPS  # a ring across nodes: the slow link
    ag_ms = f * full["all_gather"] / bw * 1e3
    grad_ms = f * (full["reduce_scatter"] + 2 * full["all_reduce"]) / bw * 1e3
    compute = compute_micro_ms * grad_accum
    backward = compute * 2 / 3
    P = sum(param_numels(cfg))
    opt_ms = P / world * (3 * 4 * 2 + 4 + 2 * elem_bytes(ds_cfg)) / HBM_BPS * 1e3  # read+write fp32 states
    if not overlap:
        exposed = ag_ms + grad_ms
    elif stage == 3:  # prefetched gathers and overlapped reduce-scatters share the whole fwd + bwd
        exposed = max(0.0, ag_ms + grad_ms - compute)
    elif stage == 2:  # reduced during every backward; the parameter all-gather after the step is exposed
        exposed = max(0.0, grad_ms - backward) + ag_ms
    else:  # ZeRO-1: reduced during the last micro-batch's backward only
        exposed = max(0.0, grad_ms - backward / grad_accum) + ag_ms
    hooks_ms = 2 * grad_accum * modules_with_params(cfg) * ZERO3_FETCH_OVERHEAD_S * 1e3 if stage == 3 else 0.0
    step = compute + exposed + opt_ms + hooks_ms
    return {
        "compute_ms": compute,
        "comm_ms": ag_ms + grad_ms,
        "exposed_comm_ms": exposed,
        "optimizer_ms": opt_ms,
        "zero3_hooks_ms": hooks_ms,
        "step_ms": step,
        "wire_gb": wire_bytes(full, world) / 1e9,
    }


def table(args) -> list[dict]:
    from roberta_ds.config import model_preset
    from roberta_ds.training.ds_config import load_ds_config

    rows = []
    for preset in args.presets.split(","):
        cfg = model_preset(preset)
        for stage in map(int, args.stages.split(",")):
            ds_cfg = load_ds_config(args.ds_configs.format(stage=stage))
            global_batch, micro = ds_cfg["train_batch_size"], ds_cfg["train_micro_batch_size_per_gpu"]
            for world in map(int, args.gpus.split(",")):
                mb = min(micro, global_batch // world)  # past 64 GPUs the micro-batch shrinks
                ga = global_batch // (mb * world)
                ms, source = compute_ms(preset, cfg, args.seq_len, mb, Path(args.report_dir))
                t = step_time(cfg, ds_cfg, world, ms, ga)
                mem = memory_per_rank(cfg, ds_cfg, world, mb, args.seq_len)
                rows.append(
                    {
                        "preset": preset,
                        "seq_len": args.seq_len,
                        "zero": stage,
                        "gpus": world,
                        "micro_batch": mb,
                        "grad_accum": ga,
                        **{k: round(v, 2) for k, v in t.items()},
                        "tokens_per_s_per_gpu": round(
                            global_batch * args.seq_len / world / t["step_ms"] * 1e3
                        ),
                        "comm_efficiency": round(t["compute_ms"] / t["step_ms"], 3),
                        "mem_gib": round(mem.total(False) / 2**30, 1),
                        "mem_ckpt_gib": round(mem.total(True) / 2**30, 1),
                        "compute_source": source,
                        "ds_config": ds_cfg["_source"],
                    }
                )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        for stage in sorted({r["zero"] for r in rows}):
            sel = [r for r in rows if r["preset"] == preset and r["zero"] == stage]
            ax.plot(
                [r["gpus"] for r in sel],
                [r["tokens_per_s_per_gpu"] for r in sel],
                {1: "o-", 2: "s--", 3: "^-"}.get(stage, "o-"),  # ZeRO-1 and 2 often coincide
                label=f"ZeRO-{stage}",
                markersize=4 + 2 * (stage == 1),
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_ylabel("tokens/s per GPU (modelled)")
        ax.set_title(f"{preset}, seq {rows[0].get('seq_len', 512)}, global batch fixed", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("H100, 450 GB/s in a node, 50 GB/s across nodes (roberta_ds.benchmarks.scaling)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latest_run(path: Path) -> list[dict]:
    """The CSV's rows of its latest run: the trailing rows of the last row's commit, the last row of
    each (preset, stage, GPUs)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tail = list(itertools.takewhile(lambda r: r["commit"] == rows[-1]["commit"], reversed(rows)))
    return list({(r["preset"], r["zero"], r["gpus"]): r for r in reversed(tail)}.values())


def markdown(rows: list[dict]) -> str:
    """The docs' table of one run (CSV rows): tokens/s per GPU per stage, and the share of the step that
    is compute for the least and the most partitioned stage; the first line says what it models."""
    half_up = doc_tables.half_up
    stages = sorted({r["zero"] for r in rows}, key=int)
    ends = [stages[0], stages[-1]]
    by = {(r["preset"], r["gpus"], r["zero"]): r for r in rows}
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    body = []
    for preset in presets:
        for gpus in sorted({r["gpus"] for r in rows if r["preset"] == preset}, key=int):
            run = [by[preset, gpus, z] for z in stages]
            body.append(
                [preset, gpus]
                + [f"{half_up(r['tokens_per_s_per_gpu'], 0, '0.001')}K" for r in run]
                + [f"{run[0]['micro_batch']} x {run[0]['grad_accum']}"]
                + [" / ".join(f"{half_up(r['comm_efficiency'], 0, 100)}%" for r in (run[0], run[-1]))]
            )
    header = ["model", "GPUs", *(f"ZeRO-{z}" for z in stages), "micro-batch x accumulation"]
    header.append(f"compute / step time, {' / '.join(f'ZeRO-{z}' for z in ends)}")
    return _markdown_head(rows, presets) + "\n\n" + doc_tables.table(header, body)


def _markdown_head(rows: list[dict], presets: list[str]) -> str:
    # one micro-batch's compute, from the rows at the largest micro-batch (compute_ms counts accumulation)
    micro = {
        p: max((r for r in rows if r["preset"] == p), key=lambda r: int(r["micro_batch"])) for p in presets
    }
    compute = ", ".join(
        f"{p} {doc_tables.half_up(Decimal(r['compute_ms']) / int(r['grad_accum']), 1)} ms"
        for p, r in micro.items()
    )
    r = rows[0]
    source = r["compute_source"]
    source = f"the static report (`{source}`)" if source.endswith(".json") else source
    configs = ", ".join(f"`{c}`" for c in sorted({x["ds_config"] for x in rows}))
    # rows from before the seq_len column were all run at its default, 512 (their compute is the s512 step)
    return (
        f"Modelled by `python -m roberta_ds.bench scaling` at commit {r['commit']} (estimates, not "
        f"measurements): H100 SXM, bf16, seq {r.get('seq_len') or 512}, global batch "
        f"{int(r['micro_batch']) * int(r['grad_accum']) * int(r['gpus'])} sequences ({configs}); "
        f"{INTRA_NODE_BPS / 1e9:.0f} GB/s per GPU inside a node of {GPUS_PER_NODE}, "
        f"{INTER_NODE_BPS / 1e9:.0f} GB/s across nodes; compute per micro-batch of "
        f"{micro[presets[0]]['micro_batch']} from {source}: {compute}"
    )


def write_markdown(csv_path: Path) -> Path:
    """The .md beside `csv_path`, from its latest run; the docs that include it follow."""
    md = Path(csv_path).with_suffix(".md")
    return doc_tables.publish(md, markdown(latest_run(Path(csv_path))))


def main(args) -> int:
    from roberta_ds.benchmarks.common import append_csv, git_commit, print_table

    if args.tables_only:
        print(f"wrote {write_markdown(Path(args.csv))}")
        return 0
    rows = table(args)
    cols = ["preset", "zero", "gpus", "micro_batch", "grad_accum", "compute_ms", "exposed_comm_ms", "step_ms",
            "tokens_per_s_per_gpu", "comm_efficiency", "mem_gib", "mem_ckpt_gib"]  # fmt: skip
    print_table(rows, cols)
    print(f"compute per micro-batch from: {rows[0]['compute_source']}")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for world in dict.fromkeys(r["gpus"] for r in rows):
            sel = [r for r in rows if r["preset"] == preset and r["gpus"] == world]
            best = max(r["tokens_per_s_per_gpu"] for r in sel)
            tied = [f"ZeRO-{r['zero']}" for r in sel if r["tokens_per_s_per_gpu"] >= 0.99 * best]
            print(f"{preset:>6} on {world:>3} GPUs: fastest {' = '.join(tied)} (within 1%)")
    from roberta_ds.config import model_preset
    from roberta_ds.training.ds_config import load_ds_config

    one = load_ds_config(args.ds_configs.format(stage=1))
    for preset in dict.fromkeys(r["preset"] for r in rows):
        m = memory_per_rank(model_preset(preset), one, 1, one["train_micro_batch_size_per_gpu"], args.seq_len)
        print(
            f"{preset}, micro-batch {one['train_micro_batch_size_per_gpu']}, seq {args.seq_len}, one GPU: "
            f"{m.total(False) / 2**30:.1f} GiB without activation checkpointing, "
            f"{m.total(True) / 2**30:.1f} GiB with (activations {m.activations / 2**30:.1f} / "
            f"{m.activations_ckpt / 2**30:.1f} GiB)"
        )
    commit = git_commit()
    append_csv(args.csv, [{**r, "commit": commit} for r in rows])
    print(f"table: {write_markdown(Path(args.csv))}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0

"""python -m kernel_tools.perf_report: the static sm_90 performance report of every hot kernel (no GPU needed).

It runs one forward + backward of the model (bf16, training mode) on meta tensors for each traced
configuration (presets base and large, seq 128 and 512, dropout 0 and 0.1, document mask off and
on; the micro-batch comes from the ds_config), records every launch (kernel_tools.trace: Triton launches
compiled for sm_90 with the specialisation a real launch gets, plus the aten ops between them),
reads each binary (kernel_tools.sass) and models its time on an H100 (kernel_tools.cost_model).

Writes (into --out, default bench_results/):
- sm90_report.csv: one row per hot-kernel variant (the columns of REPORT_COLUMNS), rows of other
  Triton versions already in the file are kept, so one file holds e.g. triton 3.6 and 3.9;
- sm90_report.md: the modelled step per configuration (time, MFU, bytes moved against the minimum,
  launches per layer) and the per-kernel table of the recipe's configuration;
- sm90_before_after.md/.json: the recipe's step against the report of commit 8726330's kernels (BEFORE), for
  each triton version both hold; docs/kernels.md includes it (`--tables-only` rewrites it alone).
Prints each kernel's difference against the committed report (--baseline) and, with --check, exits
1 when a hot kernel spills, uses mma.sync without wgmma, needs more shared memory than an SM has,
or cannot fit one CTA on an SM. Every figure is compile-time or modelled, never measured.
--calibrate (CUDA only) runs the same steps for real under torch.profiler and writes measured
against modelled per kernel into sm90_calibration.csv.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import itertools
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from kernel_tools import cost_model, sass, trace
from kernel_tools.perf_calibrate import calibrate
from roberta_ds.benchmarks import doc_tables
from roberta_ds.benchmarks.common import git_commit
from roberta_ds.config import model_preset
from roberta_ds.data.masking import max_masked
from roberta_ds.model import RobertaMLM
from roberta_ds.model.roberta import flops_per_token
from roberta_kernels import sm90

ROOT = Path(__file__).resolve().parents[1]
REPORT_COLUMNS = [
    "kernel", "variant", "preset", "seq_len", "dtype", "blocks", "num_warps", "num_stages", "grid",
    "launches_per_step", "regs", "spill_bytes", "smem_bytes", "wgmma", "mma_sync", "tma", "ctas_per_sm",
    "loop_sass", "loop_trips", "sass_total", "tc_gflop", "dram_mb", "l2_mb", "bound", "modelled_us",
    "triton", "commit",
]  # fmt: skip
DIFF_COLUMNS = ["regs", "spill_bytes", "smem_bytes", "loop_sass", "modelled_us"]
BEFORE = "sm90_8726330"  # the report of commit 8726330's kernels, before their second version


@dataclass(frozen=True)
class StepConfig:
    preset: str
    seq_len: int
    dropout: float
    document_mask: bool
    micro_batch: int

    @property
    def label(self) -> str:
        return f"{self.preset} s{self.seq_len} p{self.dropout:g}{' doc' if self.document_mask else ''}"


def trace_step(cfg: StepConfig) -> tuple[list, object]:
    """Launch sequence of one training forward + backward (bf16) of `cfg` on meta tensors."""
    mcfg = model_preset(
        cfg.preset, kernels="triton", hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout
    )
    with torch.device("meta"):
        model = RobertaMLM(mcfg).to(torch.bfloat16).train()
        B, S = cfg.micro_batch, cfg.seq_len
        ids = torch.empty(B, S, dtype=torch.long)
        mask = torch.empty(B, S, dtype=torch.long)  # the collator always passes one
        segments = torch.empty(B, S, dtype=torch.long) if cfg.document_mask else None
        labels = torch.empty(B, S, dtype=torch.long)
        # the collator's fixed-size masked positions: the training step's sync-free gather
        positions = torch.empty(B, max_masked(S, 0.15), dtype=torch.long)
    extra = (
        {"mlm_positions": positions} if "mlm_positions" in inspect.signature(model.forward).parameters else {}
    )
    with trace.trace_launches() as events:  # (a model from before mlm_positions gathers with nonzero)
        out = model(ids, attention_mask=mask, labels=labels, segment_ids=segments, **extra)
        out.loss.backward()
    return events, mcfg


def _variant(args: dict) -> str:
    flags = [k.removeprefix("HAS_").lower() for k, v in args.items() if k.isupper() and v is True]
    return "+".join(flags) or "plain"


def _blocks(args: dict) -> str:
    return "x".join(str(v) for k, v in args.items() if k.startswith("BLOCK") and isinstance(v, int))


def analyse(cfg: StepConfig, commit: str) -> tuple[list[dict], dict, list]:
    """Per-kernel-variant rows and the step summary of one configuration."""
    events, mcfg = trace_step(cfg)
    rows: dict[tuple, dict] = {}
    total = defaultdict(float)
    launches = 0
    per_launch = []
    for ev in events:
        if isinstance(ev, trace.TritonLaunch):
            binary = sass.inspect_kernel(ev.kernel, ev.name)
            cost = cost_model.triton_cost(ev, binary)
            key = (ev.name, _variant(ev.args), _blocks(ev.args), ev.grid)
            dtype = next(
                (str(v.dtype).removeprefix("torch.") for v in ev.args.values() if hasattr(v, "dtype")), ""
            )
            if key not in rows:
                rows[key] = dict(
                    kernel=ev.name, variant=key[1], preset=cfg.preset, seq_len=cfg.seq_len, dtype=dtype,
                    blocks=key[2], num_warps=ev.num_warps, num_stages=ev.num_stages, grid="x".join(map(str, ev.grid)),
                    launches_per_step=0, regs=binary.regs, spill_bytes=binary.spill_bytes,
                    smem_bytes=binary.smem_bytes, wgmma=binary.wgmma, mma_sync=binary.mma_sync, tma=binary.tma,
                    ctas_per_sm=binary.ctas_per_sm, loop_sass=binary.loop_instructions, loop_trips=cost.trips,
                    sass_total=len(binary.sass), tc_gflop=round(cost.flops / 1e9, 3),
                    dram_mb=round(cost.dram_bytes / 1e6, 3), l2_mb=round(cost.l2_bytes / 1e6, 3), bound=cost.bound,
                    modelled_us=round(cost.seconds * 1e6, 2), triton=triton.__version__, commit=commit,
                )  # fmt: skip
            rows[key]["launches_per_step"] += 1
            category = "triton"
        else:
            cost = cost_model.torch_cost(ev)
            if cost is None:
                continue
            category = "gemm" if cost_model.is_gemm(ev) else "glue"
        launches += 1
        total[category + "_s"] += cost.seconds
        total[category + "_bytes"] += cost.dram_bytes
        per_launch.append((ev.name, category, cost.seconds))
    step_s = total["triton_s"] + total["gemm_s"] + total["glue_s"]
    tokens = cfg.micro_batch * cfg.seq_len
    model_flops = flops_per_token(mcfg, cfg.seq_len) * tokens
    summary = dict(
        config=cfg.label, preset=cfg.preset, seq_len=cfg.seq_len, dropout=cfg.dropout,
        document_mask=cfg.document_mask, micro_batch=cfg.micro_batch, modelled_ms=round(step_s * 1e3, 2),
        triton_ms=round(total["triton_s"] * 1e3, 2), gemm_ms=round(total["gemm_s"] * 1e3, 2),
        glue_ms=round(total["glue_s"] * 1e3, 2),
        mfu=round(model_flops / step_s / sm90.DATASHEET_PEAK_BF16_FLOPS, 3),
        moved_gb=round((total["triton_bytes"] + total["gemm_bytes"] + total["glue_bytes"]) / 1e9, 2),
        min_gb=round((total["triton_bytes"] + total["gemm_bytes"]) / 1e9, 2),
        launches_per_layer=round(launches / mcfg.num_layers, 1),
    )  # fmt: skip
    return list(rows.values()), summary, per_launch


def check(rows: list[dict]) -> list[str]:
    """What makes a hot kernel unfit for sm_90, one message per problem."""
    problems = []
    for r in rows:
        where = f"{r['kernel']} [{r['variant']}] {r['preset']} s{r['seq_len']}"
        if int(r["spill_bytes"]) > 0:
            problems.append(f"{where}: spills {r['spill_bytes']} bytes to local memory")
        if int(r["mma_sync"]) > 0 and int(r["wgmma"]) == 0:
            problems.append(f"{where}: tensor-core dots lower to mma.sync, not Hopper wgmma")
        if int(r["smem_bytes"]) > sm90.SHARED_BYTES_PER_CTA:
            problems.append(f"{where}: {r['smem_bytes']} B of shared memory > {sm90.SHARED_BYTES_PER_CTA}")
        elif int(r["ctas_per_sm"]) < 1:
            problems.append(f"{where}: not one CTA fits an SM ({r['regs']} regs x {r['num_warps']} warps)")
    return problems


def _row_key(r: dict) -> tuple:
    return (r["kernel"], r["variant"], r["preset"], str(r["seq_len"]), r["blocks"], r["grid"])


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def diff(rows: list[dict], baseline: list[dict]) -> list[str]:
    version = ".".join(triton.__version__.split(".")[:2])
    old = {_row_key(r): r for r in baseline if r["triton"].startswith(version)}
    lines = []
    for r in rows:
        b = old.get(_row_key(r))
        if b is None:
            lines.append(f"  new      {r['kernel']} [{r['variant']}] {r['preset']} s{r['seq_len']}")
            continue
        changes = [f"{c} {b[c]} -> {r[c]}" for c in DIFF_COLUMNS if float(b[c] or 0) != float(r[c] or 0)]
        if changes:
            lines.append(
                f"  changed  {r['kernel']} [{r['variant']}] {r['preset']} s{r['seq_len']}: "
                + ", ".join(changes)
            )
    gone = set(old) - {_row_key(r) for r in rows}
    lines += [f"  gone     {k[0]} [{k[1]}] {k[2]} s{k[3]}" for k in sorted(gone)]
    return lines


def write_report(
    out: Path, rows: list[dict], summaries: list[dict], recipe: str, recipe_rows: list[dict]
) -> None:
    """`rows`: every kernel variant once (the CSV); `recipe_rows`: those of the recipe's step (the markdown)."""
    out.mkdir(parents=True, exist_ok=True)
    version = triton.__version__
    kept = [r for r in read_csv(out / "sm90_report.csv") if r["triton"] != version]
    with open(out / "sm90_report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(kept, key=lambda r: r["triton"]) + rows)
    (out / f"sm90_steps_triton{version}.json").write_text(json.dumps(summaries, indent=1) + "\n")
    doc_tables.publish(out / "sm90_report.md", markdown(recipe_rows, summaries, recipe))
    write_before_after(out, recipe)


def before_after_rows(out: Path, recipe: str) -> list[dict]:
    """The `recipe` step's figures in out/BEFORE/ and in out/, for each triton version that both hold
    (oldest version first, before then after); the commits are the reports' own."""
    report, rows = read_csv(out / "sm90_report.csv"), []
    names = [p.name for p in (out / BEFORE).glob("sm90_steps_triton*.json") if (out / p.name).is_file()]
    for name in sorted(names, key=lambda n: [int(x) for x in re.findall(r"\d+", n)]):  # 3.10 after 3.9
        version = name.removeprefix("sm90_steps_triton").removesuffix(".json")
        commit = next((r["commit"] for r in report if r["triton"] == version), "?")
        for when, path in (("before", out / BEFORE / name), ("after", out / name)):
            step = next(x for x in json.loads(path.read_text()) if x["config"] == recipe)
            rows.append({"triton": version, "kernels": when, "commit": commit, **step})
    return rows


def before_after(out: Path, recipe: str) -> str | None:
    """Markdown of before_after_rows (None if there are none)."""
    rows, half_up = before_after_rows(out, recipe), doc_tables.half_up
    if not rows:
        return None
    body = [
        [
            r["triton"],
            r["kernels"],
            f"{half_up(r['modelled_ms'], 1)} ms",
            f"{half_up(r['mfu'], 0, 100)}%",
            f"{half_up(r['moved_gb'], 1)} ({half_up(r['min_gb'], 1)})",
            r["launches_per_layer"],
        ]
        for r in rows
    ]
    commits = [f"{r['triton']} at {r['commit']}" for r in rows if r["kernels"] == "after"]
    head = (
        f"Modelled by `python -m kernel_tools.perf_report` for an H100 (compile-time figures and model "
        f"estimates, not measurements): one training step, {recipe}, micro-batch {rows[0]['micro_batch']}, "
        f"bf16; before = commit {BEFORE.removeprefix('sm90_')}'s kernels (`{out.name}/{BEFORE}/`), after = "
        f"the report's commit per triton version ({', '.join(commits)})"
    )
    header = ["triton", "kernels", "modelled step", "MFU", "GB moved (min at the interface)"]
    return head + "\n\n" + doc_tables.table([*header, "launches per layer"], body)


def write_before_after(out: Path, recipe: str) -> Path | None:
    """sm90_before_after.json (read by the README's headline table) and .md (included by docs/kernels.md)."""
    text = before_after(out, recipe)
    if not text:
        return None
    (out / "sm90_before_after.json").write_text(json.dumps(before_after_rows(out, recipe), indent=1) + "\n")
    return doc_tables.publish(out / "sm90_before_after.md", text)


def markdown(rows: list[dict], summaries: list[dict], recipe: str) -> str:
    head = rows[0]
    lines = [
        "# Static sm_90 report (compile-time figures and model estimates, not measurements)",
        "",
        f"`python -m kernel_tools.perf_report`, triton {head['triton']}, commit {head['commit']}, bf16, training mode; "
        "cost model and its error band: `kernel_tools/cost_model.py` (+-25% on a step). One forward + backward of one "
        "micro-batch; the optimizer step and ZeRO communication are not included.",
        "",
        "| config | micro-batch | modelled ms | Triton ms | GEMM ms | glue ms | MFU | GB moved | GB min | launches/layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['config']} | {s['micro_batch']} | {s['modelled_ms']} | {s['triton_ms']} | {s['gemm_ms']} | "
            f"{s['glue_ms']} | {s['mfu']:.0%} | {s['moved_gb']} | {s['min_gb']} | {s['launches_per_layer']} |"
        )
    lines += [
        "",
        f"Per kernel, {recipe} (launch = one call; step = launches x modelled):",
        "",
        "| kernel | variant | blocks | warps/stages | regs | spills B | smem KB | wgmma | CTAs/SM | loop SASS | "
        "trips | bound | modelled us | launches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {r['blocks']} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | "
            f"{r['spill_bytes']} | {int(r['smem_bytes']) / 1024:.1f} | {r['wgmma']} | {r['ctas_per_sm']} | "
            f"{r['loop_sass']} | {r['loop_trips']} | {r['bound']} | {r['modelled_us']} | {r['launches_per_step']} |"
        )
    return "\n".join(lines) + "\n"


def configs(ds_config: Path, presets, seq_lens) -> list[StepConfig]:
    micro = json.loads(ds_config.read_text())["train_micro_batch_size_per_gpu"]
    return [
        StepConfig(p, s, d, doc, micro)
        for p, s, d, doc in itertools.product(presets, seq_lens, (0.0, 0.1), (False, True))
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results")
    ap.add_argument("--baseline", type=Path, default=ROOT / "bench_results" / "sm90_report.csv")
    ap.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero1_bf16.json")
    ap.add_argument("--presets", nargs="+", default=["base", "large"])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[128, 512])
    ap.add_argument(
        "--check", action="store_true", help="exit 1 when a hot kernel spills, misses wgmma, or overflows"
    )
    ap.add_argument(
        "--calibrate", action="store_true", help="CUDA only: measured against modelled per kernel"
    )
    ap.add_argument(
        "--tables-only",
        action="store_true",
        help="only rewrite sm90_before_after.md/.json from --out's files",
    )
    args = ap.parse_args(argv)
    steps = configs(args.ds_config, args.presets, args.seq_lens)
    recipe = StepConfig(args.presets[0], max(args.seq_lens), 0.1, False, steps[0].micro_batch).label
    if args.tables_only:
        written = write_before_after(args.out, recipe)
        print(f"wrote {written}" if written else f"nothing to write: no {BEFORE}/ report in {args.out}")
        return 0
    trace.check_not_interpreted()
    commit = git_commit(("roberta_kernels", "kernel_tools"))  # what the report depends on
    baseline = read_csv(args.baseline)
    rows, summaries = [], []
    seen, recipe_rows, modelled = set(), [], []
    for cfg in steps:
        cfg_rows, summary, per_launch = analyse(cfg, commit)
        modelled.append((cfg, per_launch))
        summaries.append(summary)
        print(
            f"{cfg.label:<22} modelled {summary['modelled_ms']:>8.2f} ms  MFU {summary['mfu']:.0%}  "
            f"moved {summary['moved_gb']} GB (min {summary['min_gb']})  launches/layer {summary['launches_per_layer']}"
        )
        recipe_rows = cfg_rows if cfg.label == recipe else recipe_rows
        for r in cfg_rows:
            if _row_key(r) not in seen:
                seen.add(_row_key(r))
                rows.append(r)
    for r in rows:
        print(
            f"  {r['kernel']:<24} {r['variant']:<22} {r['preset']:<5} s{r['seq_len']:<4} regs {r['regs']:>3} "
            f"spill {r['spill_bytes']:>4} smem {r['smem_bytes']:>6} wgmma {r['wgmma']:>3} loop {r['loop_sass']:>5} "
            f"x{r['loop_trips']:<3} {r['modelled_us']:>8.2f} us ({r['bound']})"
        )
    changes = diff(rows, baseline)
    print(f"difference against {args.baseline} (triton {triton.__version__}):")
    print("\n".join(changes) if changes else "  none")
    write_report(args.out, rows, summaries, recipe, recipe_rows)
    problems = check(rows)
    for p in problems:
        print(f"CHECK FAILED: {p}", file=sys.stderr)
    if args.calibrate:
        calibrate(modelled, args.out, commit)
    return 1 if (problems and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())

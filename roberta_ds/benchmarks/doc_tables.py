"""The docs quote benchmark outputs by inclusion, never by hand. In README.md and docs/*.md, the
lines between

    <!-- include: bench_results/data_100mb.md -->
    <!-- end include -->

are that file's text as its benchmark last wrote it. A benchmark that writes a .md calls sync()
after, so a re-measurement is one command; `python -m roberta_ds.benchmarks.doc_tables --check`
(and tests/test_docs.py) fails when a doc quotes an older output.

README's headline table (bench_results/headline.md) is rendered here, by sync(), from the outputs
the benchmarks write (sm90_before_after.json, scaling.csv, data_100mb.csv, data_4gb.csv, and the GPU
suite's results under bench_results/gpu/): a headline figure is always the one its benchmark last wrote.

  python -m roberta_ds.benchmarks.doc_tables [--check]   bring the docs up to date (or list the stale)
  python -m roberta_ds.benchmarks.doc_tables --gpu-suite OUT
      publish what `bash scripts/gpu_suite.sh OUT` measured on a GPU into bench_results/gpu/
      (replacing the previous suite's results whole), then bring the docs up to date
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = re.compile(
    r"(?P<open><!-- include: (?P<path>\S+) -->\n)(?P<body>.*?)(?P<close><!-- end include -->)", re.S
)


class IncludeError(ValueError):
    pass


class SuiteError(ValueError):
    """A GPU suite's folder that cannot be published (not a suite's, a dry run, no GPU)."""


def docs(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, root: Path, where: Path, generated: dict[str, str] | None = None) -> str:
    """`text` with every include region's body replaced by its file's current text (or, for a path in
    `generated`, the text it is about to have)."""

    def body(m: re.Match) -> str:
        src = root / m["path"]
        if m["path"] in (generated or {}):
            content = generated[m["path"]]
        elif src.is_file():
            content = src.read_text()
        else:
            raise IncludeError(f"{where}: includes {m['path']}, which does not exist")
        return m["open"] + content + ("" if content.endswith("\n") else "\n") + m["close"]

    return INCLUDE.sub(body, text)


def sync(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Bring bench_results/headline.md (when a doc includes it) and every doc's include regions up to
    date (or, with check, only list the stale files)."""
    stale, head, generated = [], root / HEADLINE, {}
    if any(f"<!-- include: {HEADLINE} -->" in d.read_text() for d in docs(root) if d.is_file()):
        generated[HEADLINE] = headline(root)
        if not head.is_file() or head.read_text() != generated[HEADLINE]:
            stale.append(head)
            if not check:
                head.write_text(generated[HEADLINE])
    for doc in docs(root):
        if not doc.is_file():
            continue
        text = doc.read_text()
        new = render(text, root, doc, generated)
        if new != text:
            stale.append(doc)
            if not check:
                doc.write_text(new)
    return stale


def publish(path: Path, text: str) -> Path:
    """Write a benchmark's markdown output, then bring the docs that include it up to date; an output
    outside the repository (a test's) leaves the docs alone."""
    path = Path(path)
    path.write_text(text)
    if path.resolve().is_relative_to(ROOT):
        sync()
    return path


HEADLINE = "bench_results/headline.md"
GPU_DIR = "bench_results/gpu"  # the latest published GPU suite (scripts/gpu_suite.sh OUT), whole
GPU_ROW = [
    "measured kernel and end-to-end speed on a GPU",
    "not yet measured: no GPU has been lent to a session so far; `scripts/gpu_suite.sh` measures it all "
    "in one call, and `doc_tables --gpu-suite` publishes it here",
    "[docs/performance.md](docs/performance.md)",
]
SUITE_FILES = (".csv", ".json", ".md", ".png", ".txt", ".xml")  # results and logs, not the markers


def publish_gpu_suite(out: Path, root: Path = ROOT) -> Path:
    """Copy what `scripts/gpu_suite.sh OUT` left into root/bench_results/gpu/, replacing the previous
    suite's results whole (built beside it, then swapped in by renames), and re-render the docs. A dry
    run or a suite without a GPU is refused: its timings say nothing about a GPU."""
    out, dest = Path(out), root / GPU_DIR
    tmp, old = dest.with_name(".gpu.tmp"), dest.with_name(".gpu.old")
    if old.exists() and not dest.exists():
        old.rename(dest)  # a publish killed between its two renames: the previous suite comes back
    env = out / "env" / "env.json"
    if not env.is_file():
        raise SuiteError(f"{out}: no env/env.json, so not the folder of a scripts/gpu_suite.sh run")
    info = json.loads(env.read_text())
    if info.get("dry_run") or not info.get("gpus"):
        raise SuiteError(
            f"{env}: a {'dry run' if info.get('dry_run') else 'run without a GPU'} on {info.get('device')}; "
            "only a suite measured on a GPU is published"
        )
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.suffix in SUITE_FILES:
            (tmp / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / f.relative_to(out))
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    sync(root)
    return dest


def headline(root: Path = ROOT) -> str:
    """README's headline table from the benchmarks' outputs under root/bench_results (a row whose
    output is missing is left out)."""
    res, rows = root / "bench_results", []
    if (res / "sm90_before_after.json").is_file():
        rows.append(_step_row(json.loads((res / "sm90_before_after.json").read_text())))
    if (res / "scaling.csv").is_file():
        rows.append(_scaling_row(_latest(res / "scaling.csv", "commit")))
    gpu = res / "gpu"
    rows.append(_gpu_row(gpu) if (gpu / "env" / "env.json").is_file() else GPU_ROW)
    if (res / "data_100mb.csv").is_file():
        big = _latest(res / "data_4gb.csv", "date") if (res / "data_4gb.csv").is_file() else []
        rows.append(_data_row(_latest(res / "data_100mb.csv", "date"), big))
    return table(["what", "figure", "where"], rows)


def _latest(path: Path, key: str) -> list[dict]:
    """The CSV's rows of its latest run: the trailing rows with the last row's `key`."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r[key] == rows[-1][key]] if rows else []


def _step_row(rows: list[dict]) -> list[str]:
    after = [r for r in rows if r["kernels"] == "after"]
    before, first = rows[0], after[0]  # the oldest triton: what the GPU machines run
    figs = [
        f"{half_up(r['modelled_ms'], 1)} ms, {half_up(r['mfu'], 0, 100)}% MFU (triton {r['triton']})"
        for r in after
    ]
    return [
        f"modelled training step, {first['preset']}, seq {first['seq_len']}, "
        f"micro-batch {first['micro_batch']}, H100 bf16",
        f"{'; '.join(figs)}; {half_up(before['modelled_ms'], 1)} ms before the kernels' second version; a "
        "compile-time model, not a measurement",
        "[docs/kernels.md](docs/kernels.md)",
    ]


def _scaling_row(rows: list[dict]) -> list[str]:
    base = {int(r["gpus"]): r for r in rows if r["preset"] == "base" and r["zero"] == "1"}
    gpus = [g for g in (8, 64) if g in base]
    figs = " / ".join(f"{half_up(base[g]['tokens_per_s_per_gpu'], 0, '0.001')}K" for g in gpus)
    return [
        f"modelled tokens/s per GPU, base, {' / '.join(map(str, gpus))} GPUs, ZeRO-1",
        f"{figs} (estimates)",
        "[docs/performance.md](docs/performance.md)",
    ]


def _data_row(rows: list[dict], big: list[dict]) -> list[str]:
    one = next(r for r in rows if r["method"].endswith(", 1 worker(s)"))
    prepares = [
        r for r in rows if r["method"].startswith("roberta-ds prepare, ") and "rerun" not in r["method"]
    ]
    many = max(prepares, key=lambda r: int(r["workers"]))
    s, n = one, many["workers"]  # every row carries the run's summary

    def k(r: dict) -> str:
        return f"{half_up(r['tokens_per_s'], 0, '0.001')}K"

    pool = f", pool utilisation {half_up(s['pool_utilisation'], 2)}" if s.get("pool_utilisation") else ""
    figure = [
        f"{half_up(one['corpus_mb'], 0)} MB: {k(one)} tokens/s on 1 worker, {k(many)} on {n} "
        f"({half_up(s['efficiency'], 2)} efficient{pool})",
        f"serial fraction {half_up(s['serial_fraction'], 2)} (Amdahl at 160 GB: "
        f"{half_up(s['efficiency_64_160gb'], 2)} efficient at 64 workers)",
    ]
    if s.get("vs_run_mlm_per_worker"):
        vs = f"{half_up(s['vs_run_mlm_per_worker'], 1)}x `datasets.map` + `group_texts`"
        if s.get("vs_datatrove_per_worker"):
            vs += f" and {half_up(s['vs_datatrove_per_worker'], 2)}x datatrove's tokenizer step"
        figure.append(vs + " per worker")
    if s.get("resume_cost"):
        figure.append(f"a rerun after SIGKILL at 60% costs {half_up(s['resume_cost'], 2)} of a full run")
    ours = [[r for r in rs if r["method"].startswith("roberta-ds prepare")] for rs in (rows, big)]
    peak = [(max(float(r["peak_rss_gb_per_process"]) for r in rs), rs[0]["corpus_mb"]) for rs in ours if rs]
    rss = [f"{half_up(gb, 2)} GB at {_size(mb)}" for gb, mb in peak]
    figure.append("peak RSS per process " + ", ".join(rss))
    return [
        f"data prepare, real sentences, {one['tokenizer']} tokenizer, {one['device']}",
        "; ".join(figure),
        "[bench_results/data_100mb.md](bench_results/data_100mb.md), [docs/data.md](docs/data.md#measured)",
    ]


def _gpu_row(d: Path) -> list[str]:
    """The published GPU suite's headline figures: attention and the fused decoder + cross-entropy
    at base's shapes against their peers, and base at seq 512 end to end against transformers."""
    info = json.loads((d / "env" / "env.json").read_text())
    figs = []
    if (d / "kernels" / "kernels.csv").is_file():
        figs += _kernel_figs(_latest(d / "kernels" / "kernels.csv", "date"))
    e2e = next((s for s in ("e2e_zero1", "e2e_zero2", "e2e_zero3") if (d / s / "base.csv").is_file()), None)
    if e2e:
        figs += _e2e_figs(_latest(d / e2e / "base.csv", "date"), e2e[-1])
    return [
        f"measured on {info['device']}, bf16 (torch {info['torch']}, triton {info['triton']}, "
        f"commit {info['commit']})",
        "; ".join(figs) or "no kernel or end-to-end results: see the suite's summary",
        f"[{GPU_DIR}/SUMMARY.md]({GPU_DIR}/SUMMARY.md), [docs/performance.md](docs/performance.md)",
    ]


def _kernel_figs(rows: list[dict]) -> list[str]:
    def at(kernel: str, shape: str) -> dict[str, dict]:
        return {
            r["impl"]: r
            for r in rows
            if r["kernel"] == kernel and r["shape"].startswith(shape) and r["mode"] == "fwd+bwd"
        }

    figs = []
    att = at("attention", "base B32 S512")
    peers = {i: r for i, r in att.items() if i.startswith("sdpa-")}
    if "triton" in att and peers:
        best = min(peers, key=lambda i: float(peers[i]["ms"]))
        figs.append(
            f"attention fwd+bwd (base, seq 512, 10% padding) {half_up(att['triton']['tflops'], 0)} TFLOP/s, "
            f"{half_up(float(peers[best]['ms']) / float(att['triton']['ms']), 2)}x the fastest SDPA backend "
            f"({best})"
        )
    head = at("linear_cross_entropy", "base")
    if "triton-fused" in head and "eager" in head:
        figs.append(
            f"fused decoder + cross-entropy {half_up(head['triton-fused']['speedup_vs_eager'], 2)}x full "
            "logits + F.cross_entropy"
        )
    return figs


def _e2e_figs(rows: list[dict], stage: str) -> list[str]:
    by = {r["impl"]: r for r in rows if r["preset"] == "base" and r["seq_len"] == "512"}
    if "ours-triton" not in by:
        return []
    ours = by["ours-triton"]
    fig = f"base at seq 512, ZeRO-{stage}: {half_up(ours['tokens_per_s'], 0, '0.001')}K tokens/s"
    if ours.get("mfu"):
        fig += f", {half_up(ours['mfu'], 0, 100)}% MFU"
    if "hf-sdpa" in by:
        ratio = float(ours["tokens_per_s"]) / float(by["hf-sdpa"]["tokens_per_s"])
        fig += f", {half_up(ratio, 2)}x transformers' SDPA model"
    return [fig]


def _size(mb: str) -> str:
    return f"{half_up(float(mb) / 1000, 1)} GB" if float(mb) >= 1000 else f"{half_up(mb, 0)} MB"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def half_up(value, digits: int = 0, scale: int | str = 1) -> str:
    """`value` (a number or its CSV text) times `scale`, rounded half up at `digits` decimals, in decimal
    as a person rounds the written figure: the outputs hold decimals already rounded, and binary
    rounding turns 38.15 into 38.1 and 0.345 x 100 into 34."""
    exact = Decimal(str(value)) * Decimal(str(scale))
    return str(exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m roberta_ds.benchmarks.doc_tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--check", action="store_true", help="exit 1 if a doc quotes an older output")
    ap.add_argument("--gpu-suite", metavar="OUT", help=f"publish a GPU suite's results into {GPU_DIR}/")
    args = ap.parse_args(argv)
    try:
        if args.gpu_suite:  # publishing brings the docs up to date itself
            print(f"published {publish_gpu_suite(Path(args.gpu_suite)).relative_to(ROOT)}/")
            return 0
        stale = sync(check=args.check)
    except (IncludeError, SuiteError) as e:
        print(f"doc_tables: error: {e}", file=sys.stderr)
        return 2
    for doc in stale:
        print(f"{doc.relative_to(ROOT)}: {'out of date' if args.check else 'updated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

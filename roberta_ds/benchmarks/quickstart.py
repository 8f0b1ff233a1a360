"""The Quickstart's figures, as README quotes them (`python -m roberta_ds.bench quickstart`).

Runs `bash scripts/quickstart.sh` as a user does (2 processes, the tiny preset, export, quality gate)
with its run folder and a fresh built-in corpus cache in a temporary folder, so the whole command's
time includes preparing the corpus. Writes bench_results/quickstart.json (what was measured: device,
versions, commit, times, losses, validation, the quality gate's results) and quickstart.md, which
README includes; `--tables-only` renders the .md again from the JSON. The tables are the ones the
command itself prints (roberta_ds.evaluation.gate.format_report).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from roberta_ds.benchmarks import doc_tables
from roberta_ds.benchmarks.common import env_info

ROOT = doc_tables.ROOT
# the quality gate's results that the tables need (the cloze predictions per item are left out)
EVAL_KEYS = ("model", "finetune_lr", "cloze_items", "source_task", "examples", "seconds")


def add_args(p) -> None:
    p.add_argument(
        "--out", default=str(ROOT / "bench_results" / "quickstart.json"), help="the JSON; the .md beside it"
    )
    p.add_argument("--tables-only", action="store_true", help="only render the .md from the JSON (no run)")


def cpu() -> str:
    """'AMD EPYC 9R14 (avx512_bf16), 2 cores': the model, whether it has bf16 dot products, cores."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "CPU"
    )
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", text)]
    flags = f" ({', '.join(bf16)})" if bf16 else ""
    return f"{model}{flags}, {os.cpu_count()} cores"


def run_quickstart() -> tuple[Path, str, float, tempfile.TemporaryDirectory]:
    """(run folder, the command's stdout, its wall seconds, the temp folder to clean up)."""
    tmp = tempfile.TemporaryDirectory(prefix="quickstart-")
    d = Path(tmp.name)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    cfg["data"]["cache_dir"] = str(d / "data_cache")  # a fresh cache, as on a fresh clone
    (d / "tiny_cpu.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RUN_DIR=str(d / "run"), CONFIG=str(d / "tiny_cpu.yaml"), SETUP_APT="0")
    for k in ("TRITON_INTERPRET", "WANDB_MODE"):  # as a user's shell has them: unset
        env.pop(k, None)
    t0 = time.perf_counter()
    res = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(
            f"bench quickstart: the command failed (exit {res.returncode}):\n{res.stderr[-3000:]}"
        )
    return d / "run", res.stdout, seconds, tmp


def summarise(run: Path, stdout: str, total_seconds: float, info: dict) -> dict:
    """What README quotes, from the run folder and the command's output."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]
    ds_config = re.search(r"^quickstart: (\S+\.json)$", stdout, re.M)
    train_s = re.search(r"^quickstart: (\d+) s of training", stdout, re.M)
    evaluation = json.loads((run / "evaluation.json").read_text())
    kept = {k: evaluation[k] for k in EVAL_KEYS if k in evaluation}
    for model in ("random", "trained"):
        m = evaluation[model]
        kept[model] = {**m, "cloze": {k: v for k, v in m["cloze"].items() if not k.startswith("predictions")}}
    return {
        **info,
        "cpu": cpu(),
        "ds_config": ds_config[1] if ds_config else None,
        "train_seconds": int(train_s[1]) if train_s else None,
        "total_seconds": round(total_seconds),
        "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "valid_accuracy": [[r["step"], r["valid_accuracy"]] for r in valid],
        "evaluation": kept,
    }


def markdown(m: dict) -> str:
    from roberta_ds.evaluation.gate import format_report

    pct = " / ".join(f"{100 * a:.1f}%" for _, a in m["valid_accuracy"])
    steps = " / ".join(str(s) for s, _ in m["valid_accuracy"])
    minutes, seconds = divmod(m["total_seconds"], 60)
    head = (
        f"Measured {m['date']} at commit {m['commit']} by `python -m roberta_ds.bench quickstart`, on "
        f"{m['cpu']} (load {m['load_at_start']:.2f} at start), torch {m['torch']}, with "
        f"`{m['ds_config']}`: {m['train_seconds']} s of training (start-up included; median "
        f"{m['tokens_per_s_median']:,.0f} tokens/s), loss {m['loss_first']:.2f} -> {m['loss_last']:.2f}, "
        f"validation accuracy {pct} at steps {steps}, {m['evaluation']['seconds']:.0f} s of evaluation, "
        f"{minutes} min {seconds} s for the whole command on a fresh data cache (preparing the corpus "
        "included). Per source, the first two held-out cloze items the trained model gets right and the "
        "first two it gets wrong:"
    )
    return head + "\n\n" + format_report(m["evaluation"]) + "\n"


def main(args) -> int:
    out = Path(args.out)
    if not args.tables_only:
        info = {**env_info(), "load_at_start": os.getloadavg()[0]}
        run, stdout, seconds, tmp = run_quickstart()
        with tmp:
            m = summarise(run, stdout, seconds, info)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(m, indent=1) + "\n")
    md = doc_tables.publish(out.with_suffix(".md"), markdown(json.loads(out.read_text())))
    print(f"wrote {out} and {md}")
    return 0

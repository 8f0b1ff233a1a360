"""Data preparation: roberta-ds `prepare` at 1 and N workers against the `run_mlm.py` way on the same
corpus, with peak RSS per worker, the serial fraction and Amdahl projections, and the cost of a resume.

`--corpus sentences:400` builds (once, in --cache-dir) a 400 MB JSONL corpus of real sentences: the
built-in corpus's sentences reshuffled into documents of 5-40 sentences (real text, not repeated bytes).

The `run_mlm.py` way (transformers' examples/pytorch/language-modeling): `datasets.load_dataset`,
`.map(tokenize, batched=True, num_proc=N)`, then `.map(group_texts, batched=True, num_proc=N)`,
each map writing an Arrow cache. Both sides use the same tokenizer, the same number of processes
and the same block length; bytes are everything each leaves on disk for training.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roberta_ds.benchmarks.common import append_csv, env_info, print_table


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_mlm_way(corpus: Path, tokenizer_dir: Path, seq_len: int, num_proc: int, work: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cache = work / "hf_cache"
    t0 = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))

    def tokenize(batch):
        return tok(batch["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])

    def group_texts(examples):  # run_mlm.py's group_texts, verbatim in behaviour
        concatenated = {k: sum(examples[k], []) for k in examples}
        total = (len(concatenated["input_ids"]) // seq_len) * seq_len
        return {k: [t[i : i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    seconds = time.perf_counter() - t0
    tokens = sum(len(x) for x in tokenized["input_ids"])
    return {
        "method": "run_mlm.py (datasets.map + group_texts)",
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "bytes_on_disk": _du(cache),
        "bytes_per_token": _du(cache) / tokens,
        "token_bytes_per_token": _du(cache) / tokens,
        "blocks": len(grouped),
        "peak_rss_gb_per_process": None,
    }


def sentence_corpus(mb: int, cache_dir: str) -> Path:
    from roberta_ds.data.corpus import builtin_corpus

    out = Path(cache_dir) / f"sentences_{mb}MB.jsonl"
    if out.is_file():
        return out
    sents = []
    for line in builtin_corpus(cache_dir).open():
        sents += [s for s in re.split(r"(?<=[.;:?!])\s+", json.loads(line)["text"]) if len(s) > 20]
    rng, size = random.Random(0), 0
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        while size < mb * 1e6:
            doc = " ".join(rng.choice(sents) for _ in range(rng.randint(5, 40)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)
    tmp.rename(out)
    return out


def _prepare_cmd(corpus: Path, out: Path, tokenizer: str, seq_len: int, workers: int, task_bytes: int):
    return [sys.executable, "-m", "roberta_ds.prepare", str(corpus), "--out", str(out),
            "--tokenizer", tokenizer, "--seq-len", str(seq_len), "--workers", str(workers),
            "--task-bytes", str(task_bytes), "--no-progress"]  # fmt: skip


def run_watched(cmd: list[str], stop=None) -> tuple[float, float, bool]:
    """(seconds, peak RSS of any one process of the tree in GB, stopped?) for `cmd`; `stop()` true
    SIGKILLs the whole process group (the resume measurement)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, stopped, top = 0, False, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [top, *top.children(recursive=True)]:
                if "resource_tracker" not in " ".join(p.cmdline()):
                    peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            pass
        if stop and stop():
            os.killpg(proc.pid, signal.SIGKILL)
            stopped = True
            proc.wait()
            break
        time.sleep(0.1)
    if not stopped and proc.returncode:
        raise RuntimeError(f"{cmd}: exit {proc.returncode}: {proc.stderr.read()[-2000:]}")
    return time.perf_counter() - t0, peak / 1e9, stopped


def ours(corpus, tokenizer, seq_len, workers, work, task_bytes, kill_at=None) -> dict:
    out = work / f"ours_w{workers}_{'resume' if kill_at else 'plain'}"
    cmd = _prepare_cmd(corpus, out, tokenizer, seq_len, workers, task_bytes)
    killed = 0.0
    if kill_at:  # SIGKILL once kill_at of the tasks are complete, then rerun: the rerun is the cost

        def stop():
            n = (
                len(json.loads((out / "tasks.json").read_text())["tasks"])
                if (out / "tasks.json").is_file()
                else 0
            )
            return n and len(list((out / "tasks").glob("task_?????"))) >= kill_at * n

        killed, _, stopped = run_watched(cmd, stop)
        if not stopped:  # a small corpus can finish between two polls: no resume to measure
            return None, out / "tokenizer"
    seconds, rss, _ = run_watched(cmd)
    meta = json.loads((out / "metadata.json").read_text())
    tokens = meta["num_tokens"]
    row = {
        "method": f"roberta-ds prepare, {workers} worker(s)"
        + (f", rerun after SIGKILL at {kill_at:.0%}" if kill_at else ""),
        "workers": workers,
        "seconds": seconds,
        "seconds_before_kill": killed or None,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_worker": tokens / seconds / workers,
        "peak_rss_gb_per_process": rss,
        "tasks": meta["report"]["tasks"],
        "bytes_per_token": _du(out) / tokens,
        "token_bytes_per_token": sum(f.stat().st_size for f in out.glob("tasks/*/*.bin")) / tokens,
        "blocks": meta["num_blocks"],
    }
    return row, out / "tokenizer"


def main(args) -> int:
    from roberta_ds.data.corpus import builtin_corpus

    if args.corpus.startswith("sentences:"):
        corpus = sentence_corpus(int(args.corpus.split(":")[1]), args.cache_dir)
    else:
        corpus = Path(args.corpus) if args.corpus != "builtin" else builtin_corpus(args.cache_dir)
    size = corpus.stat().st_size
    task_bytes = max(1 << 16, size // 20)  # 20 tasks: a kill at 60% lands between tasks' ends
    n = args.num_proc
    work = Path(tempfile.mkdtemp(prefix="rds-bench-data-"))
    try:
        one, tok_dir = ours(corpus, args.tokenizer, args.seq_len, 1, work, task_bytes)
        many, _ = ours(corpus, args.tokenizer, args.seq_len, n, work, task_bytes)
        resumed, _ = ours(corpus, args.tokenizer, args.seq_len, n, work, task_bytes, kill_at=0.6)
        hf = run_mlm_way(corpus, tok_dir, args.seq_len, n, work)
        hf.update(workers=n, tokens_per_s_per_worker=hf["tokens_per_s"] / n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speedup = one["seconds"] / many["seconds"]
    # Karp-Flatt: the serial share the measured speed-up implies (1 when there was none: contention)
    serial = min(1.0, max(0.0, (n / speedup - 1) / (n - 1))) if n > 1 else 0.0
    amdahl = {w: 1 / (serial + (1 - serial) / w) / w for w in (64, 1024)}
    summary = {
        "speedup": speedup,
        "efficiency": speedup / n,
        "serial_fraction": serial,
        "efficiency_64": amdahl[64],
        "efficiency_1024": amdahl[1024],
        "resume_cost": resumed["seconds"] / many["seconds"] if resumed else None,
        "vs_run_mlm_per_worker": many["tokens_per_s_per_worker"] / hf["tokens_per_s_per_worker"],
    }
    info = env_info()
    rows = [
        {"bench": "data", **info, "corpus": str(corpus), "corpus_mb": round(size / 1e6, 1),
         "tokenizer": args.tokenizer, "seq_len": args.seq_len, "num_proc": n, **r, **summary}
        for r in (one, many, resumed, hf) if r
    ]  # fmt: skip
    cols = ["method", "seconds", "tokens_per_s", "tokens_per_s_per_worker", "peak_rss_gb_per_process",
            "bytes_per_token"]  # fmt: skip
    print(
        f"data preparation, {info['device']}, commit {info['commit']}, corpus {corpus} "
        f"({rows[0]['corpus_mb']} MB, {one['tasks']} tasks), tokenizer {args.tokenizer}, seq {args.seq_len}"
    )
    print_table(rows, cols)
    lines = [f"{k}: {'not measured' if v is None else f'{v:.3f}'}" for k, v in summary.items()]
    print("\n".join(lines))
    append_csv(args.csv, rows)
    md = Path(args.csv).with_suffix(".md")
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    md.write_text(
        f"Measured {info['date']} on {info['device']}, torch {info['torch']}, commit {info['commit']}; "
        f"corpus "
        f"{corpus.name} ({rows[0]['corpus_mb']} MB), tokenizer {args.tokenizer}, seq_len {args.seq_len}\n\n"
        + "\n".join(table)
        + "\n\n"
        + "\n".join(f"- {x}" for x in lines)
        + "\n"
    )
    return 0


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return "" if v is None else str(v)

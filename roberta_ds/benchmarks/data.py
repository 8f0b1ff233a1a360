"""Data preparation: roberta-ds `prepare` at 1 and N workers against the `run_mlm.py` way and
datatrove's tokenizer step on the same corpus, with peak RSS per worker, the serial fraction and Amdahl
projections, and the cost of a resume.

The serial fraction is measured, not inferred: prepare times its stages (metadata.json's
timings.phases), and what runs on one process whatever the number of workers (interpreter start-up,
planning, the tokenizer stage's training or loading, finalize) over the 1-worker run's wall time is
the serial share. Amdahl's law then gives the efficiency at 64 and 1,024 workers for this corpus,
and for a 160 GB one (RoBERTa's), where the tokenize work grows with the bytes, planning and
finalize with the number of tasks, and the rest stays. Karp-Flatt's serial fraction, inferred from
the measured 1 -> N speed-up, is printed beside it: on a shared machine it also counts contention.

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

from roberta_ds.benchmarks import doc_tables
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


def run_watched(cmd: list[str], stop=None, env=None) -> tuple[float, float, bool]:
    """(seconds, peak RSS of any one process of the tree in GB, stopped?) for `cmd`; `stop()` true
    SIGKILLs the whole process group (the resume measurement)."""
    import psutil

    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # not a pipe: it would fill up (datatrove logs a lot)
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err, env=env)
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
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"{cmd[:4]}: exit {proc.returncode}: {tail}")
    return time.perf_counter() - t0, peak / 1e9, stopped


def ours(corpus, tokenizer, seq_len, workers, work, task_bytes, kill_at=None, tag="") -> dict:
    out = work / f"ours_w{workers}_{'resume' if kill_at else 'plain'}{tag}"
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
    phases = meta["timings"]["phases"]
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
        # on one process whatever the workers: start-up (interpreter, imports) and the serial stages
        "startup_s": seconds - meta["timings"]["seconds"],
        **{f"{k}_s": phases.get(k, 0.0) for k in ("plan", "tokenizer", "tokenize", "finalize")},
        "task_s": task_seconds(out),
    }
    return row, out / "tokenizer"


def task_seconds(out: Path) -> float:
    """The sum of the tokenize tasks' own times ("tokenize done in 2.9s" in logs/task_*.log)."""
    done = re.compile(r"tokenize done in ([0-9.]+)s")
    return sum(float(m[1]) for log in out.glob("logs/task_*.log") for m in done.finditer(log.read_text()))


DATATROVE_SCRIPT = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
parts, out, logs, tok, n, tasks = sys.argv[1:7]
LocalPipelineExecutor(
    pipeline=[
        JsonlReader(parts, text_key="text"),
        DocumentTokenizer(out, tokenizer_name_or_path=tok, eos_token="</s>", shuffle_documents=False),
    ],
    tasks=int(tasks), workers=int(n), logging_dir=logs,
).run()
"""


def datatrove_way(corpus: Path, tok_dir: Path, num_proc: int, work: Path, tasks: int, path) -> dict | None:
    """datatrove's LocalPipelineExecutor running JsonlReader + DocumentTokenizer (no shuffle) with
    the same tokenizer and processes. Its reader shards by file, so the corpus is first cut into
    `tasks` JSONL files (not timed). None when datatrove cannot be imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import datatrove"], env=env, capture_output=True)
    if probe.returncode:
        print("datatrove is not importable: its row is left out (see --datatrove-path)", file=sys.stderr)
        return None
    parts = work / "dt_parts"
    parts.mkdir()
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    step = -(-len(lines) // tasks)
    for k in range(tasks):
        text = "".join(lines[k * step : (k + 1) * step])
        (parts / f"part_{k:03d}.jsonl").write_text(text, encoding="utf-8")
    del lines
    out = work / "dt_out"
    cmd = [sys.executable, "-c", DATATROVE_SCRIPT, str(parts), str(out), str(work / "dt_logs"),
           str(tok_dir / "tokenizer.json"), str(num_proc), str(tasks)]  # fmt: skip
    seconds, rss, _ = run_watched(cmd, env=env)
    token_bytes = sum(f.stat().st_size for f in out.rglob("*.ds"))
    tokens = token_bytes // 2  # uint16 ids: the vocabulary fits
    return {
        "method": f"datatrove (JsonlReader + DocumentTokenizer), {num_proc} worker(s)",
        "workers": num_proc,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_worker": tokens / seconds / num_proc,
        "peak_rss_gb_per_process": rss,
        "tasks": tasks,
        "bytes_per_token": _du(out) / tokens,
        "token_bytes_per_token": token_bytes / tokens,
    }


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
    if args.rss_only:
        return rss_only(corpus, args, n, work)
    try:
        ones, manys = [], []
        for r in range(args.repeats):  # interleaved, so that a slow spell hits both sides alike
            ones.append(ours(corpus, args.tokenizer, args.seq_len, 1, work, task_bytes, tag=f"_{r}"))
            manys.append(ours(corpus, args.tokenizer, args.seq_len, n, work, task_bytes, tag=f"_{r}"))
            if r:  # the first run's folder stays: its tokenizer serves the other methods
                for _, tok in (ones[-1], manys[-1]):
                    shutil.rmtree(tok.parent)
        tok_dir = ones[0][1]
        one = min((row for row, _ in ones), key=lambda row: row["seconds"])
        many = min((row for row, _ in manys), key=lambda row: row["seconds"])
        resumes = [
            ours(corpus, args.tokenizer, args.seq_len, n, work, task_bytes, kill_at=0.6, tag=f"_{r}")[0]
            for r in range(args.repeats)
        ]
        resumes = [r for r in resumes if r]  # a small corpus may finish before the kill
        resumed = min(resumes, key=lambda row: row["seconds"]) if resumes else None
        hf = run_mlm_way(corpus, tok_dir, args.seq_len, n, work)
        hf.update(workers=n, tokens_per_s_per_worker=hf["tokens_per_s"] / n)
        dt = datatrove_way(corpus, tok_dir, n, work, one["tasks"], args.datatrove_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = scaling_summary(one, many, n, size)
    summary["resume_cost"] = resumed["seconds"] / many["seconds"] if resumed else None
    summary["vs_run_mlm_per_worker"] = many["tokens_per_s_per_worker"] / hf["tokens_per_s_per_worker"]
    summary["vs_datatrove_per_worker"] = (
        many["tokens_per_s_per_worker"] / dt["tokens_per_s_per_worker"] if dt else None
    )
    info = env_info()
    rows = [
        {"bench": "data", **info, "corpus": str(corpus), "corpus_mb": round(size / 1e6, 1),
         "tokenizer": args.tokenizer, "seq_len": args.seq_len, "num_proc": n, "repeats": args.repeats,
         **r, **summary}
        for r in (one, many, resumed, hf, dt) if r
    ]  # fmt: skip
    cols = ["method", "seconds", "tokens_per_s", "tokens_per_s_per_worker", "peak_rss_gb_per_process",
            "bytes_per_token"]  # fmt: skip
    print(
        f"data preparation, {info['device']}, commit {info['commit']}, corpus {corpus} "
        f"({rows[0]['corpus_mb']} MB, {one['tasks']} tasks), tokenizer {args.tokenizer}, seq {args.seq_len}"
    )
    print_table(rows, cols)
    phases = ["startup_s", "plan_s", "tokenizer_s", "tokenize_s", "finalize_s"]
    stages = "; ".join(
        f"{r['workers']} worker(s): " + ", ".join(f"{k[:-2]} {r[k]:.2f}" for k in phases) for r in (one, many)
    )
    lines = [f"{k}: {'not measured' if v is None else f'{v:.4g}'}" for k, v in summary.items()]
    lines.append(f"stages in seconds (the fastest of {args.repeats} runs): {stages}")
    print("\n".join(lines))
    append_csv(args.csv, rows)
    md = Path(args.csv).with_suffix(".md")
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    md.write_text(
        f"Measured {info['date']} on {info['device']}, torch {info['torch']}, commit {info['commit']}; "
        f"corpus "
        f"{corpus.name} ({rows[0]['corpus_mb']} MB, {one['tasks']} tasks), tokenizer {args.tokenizer}, "
        f"seq_len {args.seq_len}; prepare rows: the fastest of {args.repeats} runs each\n\n"
        + "\n".join(table)
        + "\n\n"
        + "\n".join(f"- {x}" for x in lines)
        + "\n"
    )
    if md.resolve().is_relative_to(doc_tables.ROOT):  # the docs quote it: bring them up to date
        doc_tables.sync()
    return 0


def rss_only(corpus: Path, args, n: int, work: Path) -> int:
    """One n-worker prepare: its seconds and the peak RSS of any one of its processes."""
    try:
        from roberta_ds.data.prepare import TASK_BYTES

        row, _ = ours(corpus, args.tokenizer, args.seq_len, n, work, TASK_BYTES)  # prepare's default
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = env_info()
    row = {"bench": "data", **info, "corpus": str(corpus), "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
           "tokenizer": args.tokenizer, "seq_len": args.seq_len, "num_proc": n, **row}  # fmt: skip
    print(
        f"data preparation (peak RSS), {info['device']}, commit {info['commit']}, corpus {corpus} "
        f"({row['corpus_mb']} MB, {row['tasks']} tasks): {row['seconds']:.0f} s, "
        f"{row['tokens_per_s']:,.0f} tokens/s, peak RSS per process {row['peak_rss_gb_per_process']:.3f} GB"
    )
    append_csv(args.csv, [row])
    cols = ["method", "corpus_mb", "tasks", "seconds", "tokens_per_s", "peak_rss_gb_per_process"]
    Path(args.csv).with_suffix(".md").write_text(
        f"Measured {info['date']} on {info['device']}, torch {info['torch']}, commit {info['commit']}; "
        f"corpus {corpus.name}, tokenizer {args.tokenizer}, seq_len {args.seq_len}\n\n"
        + "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        + "| " + " | ".join(_cell(row.get(c)) for c in cols) + " |\n"
    )  # fmt: skip
    doc_tables.sync()
    return 0


ROBERTA_CORPUS_BYTES = 160e9  # RoBERTa's pretraining text (Liu et al. 2019)


def scaling_summary(one: dict, many: dict, n: int, size: int) -> dict:
    """Speed-up and efficiency as measured 1 -> n; the serial fraction as measured (the 1-worker run's
    one-process stages over its wall time) and Amdahl's efficiency at 64 and 1,024 workers, here and
    for a 160 GB corpus cut into tasks of the same size."""
    speedup = one["seconds"] / many["seconds"]
    fixed = one["startup_s"] + one["tokenizer_s"]  # does not grow with the corpus
    per_task = one["plan_s"] + one["finalize_s"]  # reads a few bytes per task
    serial = (fixed + per_task) / one["seconds"]
    scale = ROBERTA_CORPUS_BYTES / size
    parallel_160 = (one["seconds"] - fixed - per_task) * scale
    serial_160 = (fixed + per_task * scale) / (fixed + per_task * scale + parallel_160)

    def amdahl(f: float, w: int) -> float:
        return 1 / (f + (1 - f) / w) / w

    return {
        "speedup": speedup,
        "efficiency": speedup / n,
        "serial_fraction": serial,
        "efficiency_64": amdahl(serial, 64),
        "efficiency_1024": amdahl(serial, 1024),
        "serial_fraction_160gb": serial_160,
        "efficiency_64_160gb": amdahl(serial_160, 64),
        "efficiency_1024_160gb": amdahl(serial_160, 1024),
        # inferred from the speed-up alone (counts contention on a shared machine as serial)
        "karp_flatt": min(1.0, max(0.0, (n / speedup - 1) / (n - 1))) if n > 1 else 0.0,
        # inside the n-worker run, so immune to the machine's drift between runs: how busy its
        # workers were during the tokenize stage (the pool's own loss: start-up, the last tasks)
        "pool_utilisation": many["task_s"] / (n * many["tokenize_s"]) if many.get("task_s") else None,
        # the same tasks' time on n busy cores against one (shared caches and memory bandwidth;
        # compares two runs, so it also carries the drift)
        "task_slowdown": many["task_s"] / one["task_s"] if one.get("task_s") else None,
    }


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return "" if v is None else str(v)

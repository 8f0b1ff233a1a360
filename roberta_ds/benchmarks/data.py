"""Data preparation: roberta-ds `prepare` against the `run_mlm.py` way on the same corpus.

The `run_mlm.py` way (transformers' examples/pytorch/language-modeling): `datasets.load_dataset`,
`.map(tokenize, batched=True, num_proc=N)`, then `.map(group_texts, batched=True, num_proc=N)`,
each map writing an Arrow cache. Both sides use the same tokenizer, the same number of processes
and the same block length; bytes are everything each leaves on disk for training.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from kernels.bench_utils import append_csv, env_info, print_table


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
    }


def ours(corpus: Path, tokenizer: str, seq_len: int, num_proc: int, work: Path) -> tuple[dict, Path]:
    from roberta_ds.data.prepare import prepare

    out = work / "ours"
    t0 = time.perf_counter()
    prepare(
        [str(corpus)],
        out,
        tokenizer=tokenizer,
        seq_len=seq_len,
        num_proc=num_proc,
        valid_every=0,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    import json

    meta = json.loads((out / "metadata.json").read_text())
    tokens = meta["num_tokens"]
    token_bytes = _du(out) - _du(out / "tokenizer")  # shards, index, metadata: what grows with the corpus
    return (
        {
            "method": "roberta-ds prepare (packed uint16 shards)",
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "bytes_on_disk": _du(out),
            "bytes_per_token": _du(out) / tokens,
            "token_bytes_per_token": token_bytes / tokens,
            "blocks": meta["num_blocks"],
        },
        out / "tokenizer",
    )


def main(args) -> int:
    from roberta_ds.data.corpus import builtin_corpus

    corpus = Path(args.corpus) if args.corpus != "builtin" else builtin_corpus(args.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="rds-bench-data-"))
    try:
        ours_row, tok_dir = ours(corpus, args.tokenizer, args.seq_len, args.num_proc, work)
        hf_row = run_mlm_way(corpus, tok_dir, args.seq_len, args.num_proc, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = env_info()
    rows = [
        {
            "bench": "data",
            **info,
            "corpus": str(corpus),
            "corpus_mb": round(corpus.stat().st_size / 1e6, 2),
            "tokenizer": args.tokenizer,
            "seq_len": args.seq_len,
            "num_proc": args.num_proc,
            **r,
        }
        for r in (ours_row, hf_row)
    ]
    print(
        f"data preparation, {info['device']}, commit {info['commit']}, corpus {corpus} "
        f"({rows[0]['corpus_mb']} MB), tokenizer {args.tokenizer}, seq {args.seq_len}, "
        f"{args.num_proc} processes"
    )
    print_table(
        rows,
        [
            "method",
            "seconds",
            "tokens",
            "tokens_per_s",
            "bytes_on_disk",
            "bytes_per_token",
            "token_bytes_per_token",
        ],
    )
    print(
        f"speed-up {ours_row['tokens_per_s'] / hf_row['tokens_per_s']:.2f}x, "
        f"disk {hf_row['bytes_per_token'] / ours_row['bytes_per_token']:.1f}x smaller"
    )
    append_csv(args.csv, rows)
    return 0

"""python -m roberta_ds.bench {data,e2e}: benchmarks that append measured rows (device, versions,
commit) to a CSV. Kernel benchmarks live in `python -m kernels.bench`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m roberta_ds.bench", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="prepare's tokens/s and bytes per token against the run_mlm.py way")
    d.add_argument("--corpus", default="builtin", help="a JSONL file with a 'text' field, or 'builtin'")
    d.add_argument(
        "--tokenizer", default="gpt2", help="'gpt2' (RoBERTa's BPE), 'train', or a tokenizer folder"
    )
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--num-proc", type=int, default=2)
    d.add_argument("--cache-dir", default="data_cache")
    d.add_argument("--csv", default="bench_results/data.csv")
    e = sub.add_parser(
        "e2e", help="end-to-end training throughput / MFU: ours (triton, torch) vs transformers"
    )
    from roberta_ds.benchmarks.e2e import add_args

    add_args(e)
    args = ap.parse_args(argv)
    if args.what == "data":
        from roberta_ds.benchmarks.data import main as run
    else:
        from roberta_ds.benchmarks.e2e import main as run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

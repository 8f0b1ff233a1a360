"""python -m roberta_ds.prepare: corpus -> byte-level BPE -> packed token shards (see data/prepare.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from roberta_ds.data.corpus import builtin_corpus
from roberta_ds.data.prepare import prepare
from roberta_ds.errors import EXIT_BAD_INPUT, InputError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m roberta_ds.prepare", description=__doc__)
    ap.add_argument(
        "inputs",
        nargs="+",
        help="text/JSONL/Parquet files or folders, a datasets hub name, or 'builtin' for the built-in corpus",
    )
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument(
        "--tokenizer",
        default="train",
        help="'train' (new byte-level BPE), 'gpt2' (RoBERTa's BPE, offline), or a HF tokenizer folder/name",
    )
    ap.add_argument("--vocab-size", type=int, default=50265, help="for --tokenizer train")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--valid-every", type=int, default=200, help="every N-th document goes to the valid split"
    )
    ap.add_argument("--text-field", default="text", help="field of JSONL/Parquet rows holding the text")
    ap.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: up to 4)")
    ap.add_argument("--cache-dir", default="data_cache", help="where 'builtin' writes its corpus")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        inputs = [str(builtin_corpus(args.cache_dir)) if i == "builtin" else i for i in args.inputs]
        prepare(
            inputs,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            seq_len=args.seq_len,
            valid_every=args.valid_every,
            text_field=args.text_field,
            num_proc=args.num_proc,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except InputError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

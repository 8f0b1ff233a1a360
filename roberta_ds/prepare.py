"""python -m roberta_ds.prepare: corpus -> byte-level BPE -> packed token shards (docs/data.md).

One machine: `--workers N` processes. A Slurm array (slurm/prepare.sbatch): each array task runs
`--task-group $SLURM_ARRAY_TASK_ID --num-task-groups $SLURM_ARRAY_TASK_COUNT`, then one more run
without them finalizes. A rerun of any of these does only what is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from roberta_ds.data.corpus import builtin_corpus
from roberta_ds.data.prepare import SAMPLE_BYTES, TASK_BYTES, prepare
from roberta_ds.errors import EXIT_BAD_INPUT, InputError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m roberta_ds.prepare", description=__doc__)
    ap.add_argument(
        "inputs",
        nargs="+",
        help="text/JSONL/Parquet files (.gz .zst .xz too) or folders, a datasets hub name, or 'builtin'",
    )
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument(
        "--tokenizer",
        default="train",
        help="'train' (new byte-level BPE), 'gpt2' (RoBERTa's BPE, offline), or a HF tokenizer folder/name",
    )
    ap.add_argument("--vocab-size", type=int, default=50265, help="for --tokenizer train")
    ap.add_argument("--seq-len", type=int, default=512)
    split = ap.add_mutually_exclusive_group()
    split.add_argument(
        "--valid-fraction",
        type=float,
        default=0.005,
        help="share of documents held out in the valid split, chosen by a hash of each document",
    )
    split.add_argument("--valid-every", type=int, default=None, help="old spelling: --valid-fraction 1/N")
    ap.add_argument("--text-field", default="text", help="field of JSONL/Parquet rows holding the text")
    ap.add_argument(
        "--workers", "--num-proc", type=int, default=None, help="local processes (default: all cores)"
    )
    ap.add_argument(
        "--task-bytes", type=int, default=TASK_BYTES, help="plain files are cut into tasks of this size"
    )
    ap.add_argument(
        "--tokenizer-sample-bytes",
        type=int,
        default=SAMPLE_BYTES,
        help="--tokenizer train: bytes of the uniform sample of documents the BPE is trained on",
    )
    ap.add_argument(
        "--task-group", type=int, default=None, help="run only tasks g, g + M, ... (Slurm arrays)"
    )
    ap.add_argument("--num-task-groups", type=int, default=1, help="M, the number of task groups")
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
            valid_fraction=args.valid_fraction,
            valid_every=args.valid_every,
            text_field=args.text_field,
            workers=args.workers,
            task_bytes=args.task_bytes,
            tokenizer_sample_bytes=args.tokenizer_sample_bytes,
            task_group=args.task_group,
            num_task_groups=args.num_task_groups,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except InputError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())

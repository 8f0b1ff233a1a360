"""python -m roberta_ds.bench {data,e2e,convergence,scaling,comms,quickstart}: benchmarks and models
that write their rows (device, versions, commit) to CSV/JSON. Kernel benchmarks live in
`python -m kernel_tools.bench`.

- data: prepare's tokens/s and bytes per token against the run_mlm.py way
- e2e: end-to-end training throughput / MFU: ours (triton, torch) vs transformers
- convergence: ours vs transformers' model, same initial weights and batches, loss curves
- scaling: ZeRO 1/2/3 communication, memory and step time from 8 to 512 GPUs (a model, no GPU)
- comms: DeepSpeed's comms logger against the scaling model's bytes (run under torchrun)
- quickstart: the README's main job as a user runs it; README quotes its figures and tables
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {  # name -> (module in roberta_ds.benchmarks, help)
    "data": ("data", "prepare's tokens/s and bytes per token against the run_mlm.py way"),
    "e2e": ("e2e", "end-to-end training throughput / MFU: ours (triton, torch) vs transformers"),
    "convergence": ("convergence", "loss curves: ours vs transformers from the same weights and batches"),
    "scaling": ("scaling", "ZeRO 1/2/3 comms, memory and step time from 8 to 512 GPUs (modelled)"),
    "comms": ("comms_check", "DeepSpeed's comms logger against the scaling model (under torchrun)"),
    "quickstart": ("quickstart", "the README's main job as a user runs it: README's Quickstart figures"),
}


def _add_data_args(d) -> None:
    d.add_argument("--corpus", default="builtin", help="a JSONL file with a 'text' field, or 'builtin'")
    d.add_argument(
        "--tokenizer", default="gpt2", help="'gpt2' (RoBERTa's BPE), 'train', or a tokenizer folder"
    )
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--num-proc", type=int, default=2)
    d.add_argument("--cache-dir", default="data_cache")
    d.add_argument("--csv", default="bench_results/data.csv")
    d.add_argument(
        "--repeats", type=int, default=3, help="runs of the 1- and N-worker prepares; the fastest counts"
    )
    d.add_argument(
        "--rss-only",
        action="store_true",
        help="one --num-proc prepare of --corpus: seconds and peak RSS per process (the 4 GB check)",
    )
    d.add_argument(
        "--datatrove-path",
        default=None,
        help="a folder to put on sys.path for datatrove (pip install --no-deps --target DIR datatrove "
        "loguru humanize); without it, datatrove is used if importable, else its row is left out",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m roberta_ds.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="what", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == "data":
            _add_data_args(p)
        else:
            importlib.import_module(f"roberta_ds.benchmarks.{module}").add_args(p)
    args = ap.parse_args(argv)
    return importlib.import_module(f"roberta_ds.benchmarks.{COMMANDS[args.what][0]}").main(args)


if __name__ == "__main__":
    code = main()
    if "deepspeed" in sys.modules:
        # DeepSpeed's module globals keep gloo's threads alive into finalisation, which can abort
        # a finished run (SIGABRT: "terminate called without an active exception", seen in CI).
        from roberta_ds.training.exit_status import exit_now

        exit_now(code)
    sys.exit(code)

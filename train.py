"""Pretrain RoBERTa: parse, build, fit.

  deepspeed --num_gpus 8 train.py --config configs/base.yaml --deepspeed_config ds_configs/zero1_bf16.json
  torchrun --nproc_per_node 2 train.py --config configs/tiny_cpu.yaml \
      --deepspeed_config ds_configs/cpu_zero3.json
  python train.py ...   (one process)
Exit codes: 0 done; 99 preempted or time limit (checkpoint saved: run again to resume);
98 too many consecutive non-finite losses (weights saved aside, latest unchanged); 2 bad input
(config, ds_config, dataset, checkpoint, no space left for a checkpoint); 3 the process group could
not form (unreachable master, RDZV_TIMEOUT).
"""

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from roberta_ds.config import load_run_config
from roberta_ds.errors import EXIT_BAD_INPUT, EXIT_RENDEZVOUS, InputError, RendezvousError


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default=None, help="run YAML (model/data/train sections); default: tiny preset"
    )
    ap.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="ds_config",
        default=None,
        help="DeepSpeed JSON: batch sizes, precision, ZeRO stage, clipping, offload "
        "(default: ds_configs/zero1_bf16.json with a GPU, ds_configs/cpu_zero3.json without)",
    )
    ap.add_argument("--run_dir", "--run-dir", default=None, help="overrides train.run_dir")
    ap.add_argument(
        "--resume", default=None, help="overrides train.resume ('auto', a run or checkpoint folder)"
    )
    ap.add_argument("--max_steps", "--max-steps", type=int, default=None, help="overrides train.max_steps")
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per step.
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {
        k: v
        for k, v in (("run_dir", args.run_dir), ("resume", args.resume), ("max_steps", args.max_steps))
        if v is not None
    }
    try:
        cfg = load_run_config(args.config, {"train": overrides})  # fast: no torch imported yet
        from roberta_ds.training.distributed import shutdown
        from roberta_ds.training.engine import Trainer
        from roberta_ds.training.preflight import default_ds_config

        if args.ds_config is None:
            args.ds_config = default_ds_config(Path(__file__).resolve().parent)
            logging.info("no --deepspeed_config given: using %s (fits this device)", args.ds_config)
        trainer = Trainer(cfg, args.ds_config)
        code = trainer.fit()
    except InputError as e:  # one message naming the file / key / value; no traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RendezvousError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_RENDEZVOUS
    shutdown()  # every rank got here: tear the process group down cleanly
    return code


def exit_now(code: int) -> None:
    """Leave without interpreter finalisation. DeepSpeed keeps its process groups referenced in
    module globals, so gloo's worker threads outlive destroy_process_group() and can release tensors
    while Python finalises, aborting a finished run (seen under mpirun, exit 134). Everything is
    written and flushed by now (checkpoints, metrics.jsonl, DeepSpeed's monitors flush per write)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun treats a rank that exits without MPI_Finalize as failed
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

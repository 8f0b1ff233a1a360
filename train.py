"""Pretrain RoBERTa: parse, build, fit.

  deepspeed --num_gpus 8 train.py --config configs/base.yaml --deepspeed_config ds_configs/zero3_bf16.json
  torchrun --nproc_per_node 2 train.py --config configs/tiny_cpu.yaml \
      --deepspeed_config ds_configs/cpu_zero3.json
  python train.py ...   (one process)
Exit codes: 0 done; 99 preempted or time limit (checkpoint saved: run again to resume);
98 too many consecutive non-finite losses (checkpoint saved); 2 bad configuration;
3 the process group could not form (unreachable master, RDZV_TIMEOUT).
"""

import argparse
import logging
import os
import sys
import warnings

from roberta_ds.config import ConfigError, load_run_config
from roberta_ds.data.dataset import DatasetError
from roberta_ds.training.checkpoint import CheckpointError
from roberta_ds.training.distributed import RendezvousError, shutdown
from roberta_ds.training.ds_config import DSConfigError


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", default=None, help="run YAML (model/data/train sections); default: tiny preset"
    )
    ap.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="ds_config",
        default="ds_configs/zero3_bf16.json",
        help="DeepSpeed JSON: batch sizes, precision, ZeRO stage, clipping, offload",
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
        cfg = load_run_config(args.config, {"train": overrides})
        from roberta_ds.training.engine import Trainer

        trainer = Trainer(cfg, args.ds_config)
    except (ConfigError, DSConfigError, DatasetError, CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except RendezvousError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    code = trainer.fit()
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

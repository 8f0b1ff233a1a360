"""Pretrain RoBERTa: parse, resolve, build, fit.

  deepspeed --num_gpus 8 train.py --config configs/base.yaml --deepspeed_config ds_configs/zero1_bf16.json
  torchrun --nproc_per_node 2 train.py --config configs/tiny_cpu.yaml \
      --deepspeed_config ds_configs/cpu_zero3.json
  python train.py ...   (one process)
Exit codes: 0 done; 99 preempted or time limit (checkpoint saved: run again to resume);
98 too many consecutive non-finite losses (weights saved aside, latest unchanged); 2 bad input
(config, ds_config, dataset, checkpoint, no space left for a checkpoint); 3 the process group could
not form (unreachable master, RDZV_TIMEOUT). Launchers may return others (torchrun: 1): read
<run_dir>/EXIT_STATUS instead (docs/reliability.md).
"""

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from roberta_ds.config import load_run_config
from roberta_ds.errors import EXIT_BAD_INPUT, EXIT_RENDEZVOUS, InputError, RendezvousError, RunDirInUse
from roberta_ds.training import exit_status
from roberta_ds.training.preemption import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    StopFlag,
    stopped_message,
    watch_launcher,
)

STARTED = time.time()  # a verdict in EXIT_STATUS older than this is a previous run's


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
    run_dir = exit_status.run_dir_of(args.config, args.run_dir)  # where the verdict goes
    # Before the imports: a Ctrl-C or SIGTERM during start-up is a stop like any other (held until
    # the first step boundary), and a second Ctrl-C aborts at once.
    stop = StopFlag(["SIGTERM", "SIGINT"], None, run_dir)
    watch_launcher()  # a launcher that dies (even during the imports) stops this rank
    exit_status.reserve(run_dir)
    try:
        cfg = load_run_config(args.config, {"train": overrides})  # fast: no torch imported yet
        stop.arm([cfg.train.preempt_signal], cfg.train.time_limit_minutes)
        from roberta_ds.training.distributed import shutdown
        from roberta_ds.training.engine import Trainer
        from roberta_ds.training.preflight import default_ds_config
        from roberta_ds.training.resolve import resolve_run

        if args.ds_config is None:
            args.ds_config = default_ds_config(Path(__file__).resolve().parent)
            logging.info("no --deepspeed_config given: using %s (fits this device)", args.ds_config)
        run = resolve_run(cfg, args.ds_config)  # every input read and checked, before any process group
        trainer = Trainer(run, stop)  # builds: process group, data, engine, resumed state
        code = trainer.fit()
    except (InputError, RendezvousError) as e:  # one message naming the file / key / value; no traceback
        msg = f"train.py: error: {e}"
        print(msg, file=sys.stderr)
        if isinstance(e, RunDirInUse):  # the folder's EXIT_STATUS is the live run's
            return EXIT_BAD_INPUT
        return exit_status.record(
            EXIT_BAD_INPUT if isinstance(e, InputError) else EXIT_RENDEZVOUS, msg, run_dir
        )
    except Exception as e:
        verdict = exit_status.explain(e, run_dir, since=STARTED)  # a full disk, another rank's verdict
        if verdict is not None:
            print(verdict[1], file=sys.stderr)
            return exit_status.record(*verdict, run_dir)
        exit_status.record(1, f"train.py: failed: {type(e).__name__}: {e}", run_dir)
        raise  # a bug: the traceback stays
    trainer.watchdog.finish()  # leaving on purpose: the others must not read it as a stall
    shutdown()  # every rank got here: tear the process group down cleanly
    msg = {
        EXIT_PREEMPTED: stopped_message(trainer.step),
        EXIT_NONFINITE: f"train.py: stopped at step {trainer.step} on non-finite losses (see the log)",
    }.get(code, "")
    if msg and trainer.rank == 0:
        print(f"{msg} (exit {code})", file=sys.stderr)
    return exit_status.record(code, msg or "train.py: done", run_dir)


if __name__ == "__main__":
    exit_status.exit_now(main())

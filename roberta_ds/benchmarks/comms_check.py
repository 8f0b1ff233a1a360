"""Measure DeepSpeed's collective traffic with its own comms logger and set it beside the model in
roberta_ds.benchmarks.scaling (run under torchrun; one process group serves every stage).

For each ZeRO stage: build the model (inside zero.Init for stage 3), AdamW as training builds it,
deepspeed.initialize with the stage's ds_config plus `"comms_logger": {"enabled": true, "prof_all":
true}`, run `--warmup` optimizer steps, clear the logger, run `--steps` more, and read the logger's
per-op message bytes (DeepSpeed counts the `tensor` argument: the input shard of an all-gather, the
whole input of a reduce-scatter or all-reduce). Rank 0 writes one JSON row per stage to --out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from roberta_ds.benchmarks import scaling

DS_CONFIGS = {s: f"ds_configs/cpu_zero{s}.json" for s in (1, 2, 3)}


def add_args(p) -> None:
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="DeepSpeed's bf16 mode (fp32 master weights)")
    p.add_argument("--overlap-comm", action="store_true", help="zero_optimization.overlap_comm, as on GPUs")
    p.add_argument("--out", default="bench_results/comms_check.json")


def logged_bytes() -> dict[str, int]:
    """Message bytes per op name summed over every call since the last reset."""
    from deepspeed.comm.comm import comms_logger

    return {
        op: sum(size * vals[0] for size, vals in sizes.items())
        for op, sizes in comms_logger.get_raw_data().items()
    }


def measure_stage(stage: int, args, model_cfg) -> dict:
    import deepspeed
    from deepspeed.comm.comm import comms_logger

    from roberta_ds.model import RobertaMLM
    from roberta_ds.training.ds_config import load_ds_config
    from roberta_ds.training.optim import param_groups

    ds_cfg = load_ds_config(DS_CONFIGS[stage])
    ds_cfg.pop("_source")
    ds_cfg.pop("csv_monitor", None)
    ds_cfg.update(
        train_batch_size=None,
        train_micro_batch_size_per_gpu=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        comms_logger={"enabled": True, "prof_all": True, "verbose": False, "debug": False},
    )
    if args.bf16:
        ds_cfg["bf16"] = {"enabled": True}
    if args.overlap_comm:
        ds_cfg["zero_optimization"]["overlap_comm"] = True
    ds_cfg = {k: v for k, v in ds_cfg.items() if v is not None}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=stage == 3):
        model = RobertaMLM(model_cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    g = torch.Generator().manual_seed(1 + torch.distributed.get_rank())
    world = torch.distributed.get_world_size()

    def step():
        for _ in range(args.grad_accum):
            ids = torch.randint(4, model_cfg.vocab_size, (args.micro_batch, args.seq_len), generator=g)
            labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
            loss = engine(ids.to(engine.device), labels=labels.to(engine.device)).loss
            engine.backward(loss)
            engine.step()

    for _ in range(args.warmup):
        step()
    comms_logger.reset_data()
    for _ in range(args.steps):
        step()
    measured = {op: b / args.steps for op, b in logged_bytes().items()}
    comms_logger.reset_data()
    full = scaling.comms_per_step(model_cfg, ds_cfg, world, grad_accum=args.grad_accum)
    modelled = scaling.logged_bytes_per_step(full, world)
    engine.destroy()
    return {
        "stage": stage,
        "world_size": world,
        "grad_accum": args.grad_accum,
        "precision": "bf16" if args.bf16 else "fp32",
        "measured": measured,
        "modelled": modelled,
    }


def main(args) -> int:
    from roberta_ds.config import model_preset
    from roberta_ds.training.distributed import init_distributed, shutdown

    init_distributed()
    model_cfg = model_preset(
        args.preset,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.seq_len + 2,
        kernels="torch",
    )
    rows = [measure_stage(int(s), args, model_cfg) for s in args.stages.split(",")]
    if torch.distributed.get_rank() == 0:
        for r in rows:
            cells = [
                f"{op} {r['measured'].get(op, 0):.0f} / {want:.0f}"
                + (f" ({r['measured'].get(op, 0) / want - 1:+.2%})" if want else "")
                for op, want in r["modelled"].items()
            ]
            head = f"ZeRO-{r['stage']}, {r['world_size']} ranks, {r['precision']}"
            print(f"{head}, bytes logged / modelled per step: " + "; ".join(cells))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    shutdown()  # then roberta_ds.bench leaves with exit_now, as train.py does
    return 0

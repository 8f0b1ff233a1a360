"""End-to-end training throughput: our model on Triton kernels, our model on the PyTorch reference
path, and transformers' RobertaForMaskedLM (attn_implementation="sdpa"), each under the same
DeepSpeed config, micro-batch and data (random tokens, 15% masked with 80/10/10), one process.

Reports tokens/s, MFU (model FLOPs per token from the config, RobertaMLM.flops_per_token, over the
device's dense peak) and peak memory; with --find-max-batch, the largest micro-batch that fits
(doubling until out of memory). The micro-batch is the one value this tool sets over the ds_config
(it is what is being measured); everything else comes from the JSON.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from roberta_ds.benchmarks.common import append_csv, env_info, print_table

IMPLS = ("ours-triton", "ours-torch", "hf-sdpa")


def add_args(p) -> None:
    p.add_argument("--presets", default="base,large")
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--deepspeed_config", default="ds_configs/zero3_bf16.json")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--find-max-batch", action="store_true")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's dense peak FLOP/s")
    p.add_argument("--csv", default="bench_results/e2e.csv")
    p.add_argument("--plot", default="bench_results/e2e.png")


def _batch(vocab: int, mb: int, seq: int, g: torch.Generator, device) -> dict:
    ids = torch.randint(4, vocab - 1, (mb, seq), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    chosen = torch.rand(mb, seq, generator=g) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    u = torch.rand(mb, seq, generator=g)
    x = ids.clone()
    x[chosen & (u < 0.8)] = vocab - 1  # <mask>
    rnd = chosen & (u >= 0.8) & (u < 0.9)
    x[rnd] = torch.randint(4, vocab - 1, (int(rnd.sum()),), generator=g)
    return {
        k: v.to(device)
        for k, v in {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}.items()
    }


def _model(impl: str, preset: str):
    from roberta_ds.config import model_preset
    from roberta_ds.model import RobertaMLM
    from roberta_ds.model.hf import hf_config_from_model_config

    cfg = model_preset(preset, kernels="triton" if impl == "ours-triton" else "torch")
    if impl == "hf-sdpa":
        from transformers import RobertaForMaskedLM

        hf_cfg = hf_config_from_model_config(cfg)
        hf_cfg._attn_implementation = "sdpa"  # what from_pretrained(..., attn_implementation="sdpa") sets
        return RobertaForMaskedLM(hf_cfg), cfg
    return RobertaMLM(cfg), cfg


def measure(impl: str, preset: str, seq: int, mb: int, ds_cfg: dict, warmup: int, steps: int) -> dict:
    import deepspeed

    from roberta_ds.model.roberta import flops_per_token
    from roberta_ds.training.ds_config import for_engine

    cfg_engine = for_engine(
        {
            **ds_cfg,
            "train_micro_batch_size_per_gpu": mb,
            "train_batch_size": None,
            "gradient_accumulation_steps": 1,
        },
        1,
        Path("/tmp"),
    )
    for mon in ("tensorboard", "csv_monitor"):
        cfg_engine.pop(mon, None)
    model, cfg = _model(impl, preset)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.01,
        fused=torch.cuda.is_available(),
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg_engine)
    device = engine.device
    g = torch.Generator().manual_seed(0)
    batches = [_batch(cfg.vocab_size, mb, seq, g, device) for _ in range(4)]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        out = engine(**batches[i % len(batches)])
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach())
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * mb * seq / seconds
    flops = flops_per_token(cfg, seq)  # the same model FLOPs for all three implementations
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del engine, model, opt
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "impl": impl,
        "preset": preset,
        "seq_len": seq,
        "micro_batch": mb,
        "steps": steps,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "peak_mem_gib": peak_mem,
        "final_loss": float(torch.stack(losses).float()[-1]),
    }


def max_micro_batch(impl, preset, seq, ds_cfg) -> int | None:
    if not torch.cuda.is_available():
        return None
    best, mb = None, 8
    while mb <= 1024:
        try:
            measure(impl, preset, seq, mb, ds_cfg, warmup=1, steps=1)
            best, mb = mb, mb * 2
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            break
    return best


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["preset"], r["seq_len"]) for r in rows})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 4))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        vals = [
            next(
                (r["tokens_per_s"] for r in rows if r["impl"] == impl and (r["preset"], r["seq_len"]) == g), 0
            )
            for g in groups
        ]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{p}\nseq {s}" for p, s in groups])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"training throughput, {rows[0]['device']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(args) -> int:
    from roberta_ds.training.distributed import init_distributed, shutdown
    from roberta_ds.training.ds_config import load_ds_config, precision
    from roberta_ds.training.metrics import peak_flops

    ds_cfg = load_ds_config(args.deepspeed_config)
    ds_cfg.pop("_source")
    init_distributed()
    peak = peak_flops(precision(ds_cfg), args.peak_flops)
    info = env_info()
    rows = []
    for preset in args.presets.split(","):
        for seq in map(int, args.seq_lens.split(",")):
            for impl in args.impls.split(","):
                r = measure(impl, preset, seq, args.micro_batch, ds_cfg, args.warmup, args.steps)
                r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
                if args.find_max_batch:
                    r["max_micro_batch"] = max_micro_batch(impl, preset, seq, ds_cfg)
                rows.append({"bench": "e2e", **info, "precision": precision(ds_cfg), **r})
                print_table(
                    [rows[-1]],
                    [
                        "impl",
                        "preset",
                        "seq_len",
                        "micro_batch",
                        "tokens_per_s",
                        "mfu",
                        "peak_mem_gib",
                        "final_loss",
                    ],
                )
    print(
        f"\nend-to-end training, {info['device']}, commit {info['commit']}, {precision(ds_cfg)}, "
        f"ZeRO stage {ds_cfg.get('zero_optimization', {}).get('stage', 0)}"
    )
    print_table(
        rows,
        [
            "impl",
            "preset",
            "seq_len",
            "micro_batch",
            "tokens_per_s",
            "mfu",
            "peak_mem_gib",
            "max_micro_batch",
        ],
    )
    append_csv(args.csv, rows)
    Path(args.csv).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, Path(args.plot))
    shutdown()  # then roberta_ds.bench leaves with exit_now, as train.py does
    return 0

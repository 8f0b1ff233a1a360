"""Preflight, before any process group or model exists: the device against the launch (GPU count,
precision, kernels) and a memory estimate against what the node has. A refusal names the numbers.

Memory per rank (Rajbhandari et al. 2020, ZeRO, section 3; Korthikanti et al. 2022, section 4):
- model states: weights (4 B fp32, plus 2 B of 16-bit copy with bf16/fp16), gradients (4 B / 2 B),
  Adam moments and fp32 master (8 B, + 4 B with 16-bit); ZeRO-1 partitions the optimizer states,
  ZeRO-2 also the gradients, ZeRO-3 also the weights, over the world size.
- activations: s b h (34 + 5 a s / h) bytes per layer at 16 bits (twice that in fp32), at the
  micro-batch, plus the masked rows' logits and their gradient.
On a GPU the estimate is compared with the free memory of one device; on CPU every rank of the node
shares host memory, so local ranks x estimate is compared with MemAvailable.
"""

from __future__ import annotations

import os

import torch

from roberta_ds.config import ConfigError, ModelConfig
from roberta_ds.training.ds_config import DSConfigError

GiB = 2**30


def num_parameters(m: ModelConfig) -> int:
    h, layers, ff, v = m.hidden_size, m.num_layers, m.intermediate_size, m.vocab_size
    per_layer = 4 * h * h + 4 * h + 2 * h * ff + ff + h + 4 * h  # attention, MLP, 2 LayerNorms
    embeddings = (v + m.max_position_embeddings + m.type_vocab_size) * h + 2 * h
    head = h * h + h + 2 * h + v  # dense + LayerNorm + decoder bias (decoder weight tied)
    return layers * per_layer + embeddings + head


def estimate_bytes(
    m: ModelConfig, precision: str, stage: int, world: int, micro: int, seq: int, mlm_p: float
) -> dict[str, float]:
    """Estimated bytes per rank: model states and activations."""
    p = num_parameters(m)
    half = precision in ("bf16", "fp16")
    weights, grads, optim = (6, 2, 12) if half else (4, 4, 8)
    states = p * (
        weights / (world if stage >= 3 else 1)
        + grads / (world if stage >= 2 else 1)
        + optim / (world if stage >= 1 else 1)
    )
    h, a = m.hidden_size, m.num_heads
    act = seq * micro * h * (34 + 5 * a * seq / h) * m.num_layers * (1 if half else 2)
    logits = 2 * micro * seq * mlm_p * m.vocab_size * 4
    return {"parameters": p, "states": states, "activations": act + logits}


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def preflight(
    m: ModelConfig, ds_cfg: dict, precision: str, world: int, local_world: int, seq: int, mlm_p: float
) -> str:
    """Refuse a launch that cannot fit; returns a one-line summary of the estimate."""
    src = ds_cfg.get("_source", "ds_config")
    cuda = torch.cuda.is_available()
    if m.kernels == "triton" and not cuda:
        raise ConfigError("model.kernels='triton' needs a CUDA GPU; use 'torch' or 'auto' on CPU")
    if cuda and local_world > torch.cuda.device_count():
        raise DSConfigError(
            f"{local_world} ranks were launched on this node but it has {torch.cuda.device_count()} GPUs; "
            "launch one rank per GPU (e.g. deepspeed --num_gpus N / torchrun --nproc_per_node N)"
        )
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    est = estimate_bytes(m, precision, stage, world, ds_cfg["train_micro_batch_size_per_gpu"], seq, mlm_p)
    per_rank = est["states"] + est["activations"]
    summary = (
        f"memory estimate per rank: {per_rank / GiB:.2f} GiB ({est['parameters'] / 1e6:.1f}M parameters, "
        f"model states {est['states'] / GiB:.2f} GiB at ZeRO-{stage} over {world} ranks, "
        f"activations {est['activations'] / GiB:.2f} GiB)"
    )
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if cuda and not offload:
        free, total = torch.cuda.mem_get_info()
        if per_rank > free:
            raise DSConfigError(
                f"{src}: does not fit: {summary} > {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB on "
                f"{torch.cuda.get_device_name()}; lower train_micro_batch_size_per_gpu, raise the ZeRO "
                "stage or offload"
            )
    elif not cuda:
        avail = mem_available()
        if avail is not None and per_rank * local_world > avail:
            raise DSConfigError(
                f"{src}: does not fit on this node without GPUs: "
                f"{local_world} ranks x {per_rank / GiB:.2f} GiB "
                f"= {per_rank * local_world / GiB:.1f} GiB > {avail / GiB:.1f} GiB of host memory available "
                f"({summary}); no CUDA GPU was found - was a GPU launch meant for another machine?"
            )
    return summary


def default_ds_config(repo_root: os.PathLike) -> str:
    """The DeepSpeed config that fits this device when none is given."""
    name = "zero1_bf16.json" if torch.cuda.is_available() else "cpu_zero3.json"
    return str(os.path.join(repo_root, "ds_configs", name))

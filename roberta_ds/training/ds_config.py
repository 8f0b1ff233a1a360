"""DeepSpeed JSON configs: the only owner of batch size, precision, ZeRO stage, clipping, offload.

This module reads and checks them before anything starts; it never invents their values. The run
YAML owns the optimiser recipe (AdamW hyper-parameters, schedule), so `optimizer` and `scheduler`
sections here are refused rather than silently competing with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from roberta_ds.errors import InputError


class DSConfigError(InputError):
    pass


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DSConfigError(f"DeepSpeed config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise DSConfigError(f"{path}: the top level must be a JSON object")
    for owned in ("optimizer", "scheduler"):
        if owned in cfg:
            raise DSConfigError(
                f"{path}: remove the {owned!r} section: roberta-ds builds AdamW and its warmup/decay "
                "schedule from the run YAML (train.lr, train.betas, train.warmup_steps, ...)"
            )
    cfg["_source"] = str(path)
    return cfg


def resolve_batch(cfg: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_per_gpu, gradient_accumulation_steps), filled in as DeepSpeed
    does from any two of them, and checked: train_batch_size = micro x accumulation x world size."""
    src = cfg.get("_source", "<ds_config>")
    tb = cfg.get("train_batch_size")
    mb = cfg.get("train_micro_batch_size_per_gpu")
    ga = cfg.get("gradient_accumulation_steps")
    for name, v in (
        ("train_batch_size", tb),
        ("train_micro_batch_size_per_gpu", mb),
        ("gradient_accumulation_steps", ga),
    ):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DSConfigError(f"{src}: {name} must be a positive integer, got {v!r}")
    if tb is not None and mb is not None and ga is None:
        if tb % (mb * world_size):
            raise DSConfigError(
                f"{src}: train_batch_size={tb} is not divisible by train_micro_batch_size_per_gpu={mb} x "
                f"world size {world_size}; choose a train_batch_size that is a multiple of {mb * world_size}"
            )
        ga = tb // (mb * world_size)
    elif tb is not None and ga is not None and mb is None:
        if tb % (ga * world_size):
            raise DSConfigError(
                f"{src}: train_batch_size={tb} is not divisible by gradient_accumulation_steps"
                f"={ga} x world size {world_size}"
            )
        mb = tb // (ga * world_size)
    elif mb is not None and tb is None:
        ga = ga or 1
        tb = mb * ga * world_size
    elif tb is not None and mb is not None and ga is not None:
        if tb != mb * ga * world_size:
            raise DSConfigError(
                f"{src}: train_batch_size={tb} != train_micro_batch_size_per_gpu={mb} x "
                f"gradient_accumulation_steps={ga} x world size {world_size} (= {mb * ga * world_size})"
            )
    else:
        raise DSConfigError(
            f"{src}: set train_micro_batch_size_per_gpu (and train_batch_size or gradient_accumulation_steps)"
        )
    return tb, mb, ga


def precision(cfg: dict[str, Any]) -> str:
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    # DeepSpeed reads "bfloat16" as an alias of "bf16" (deepspeed/runtime/config.py)
    bf16 = (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False)
    if fp16 and bf16:
        raise DSConfigError(f"{cfg.get('_source')}: fp16 and bf16 are both enabled; pick one")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    dev = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


def check_for_device(cfg: dict[str, Any], device_type: str) -> None:
    if device_type != "cuda" and precision(cfg) == "fp16":
        raise DSConfigError(
            f"{cfg.get('_source')}: fp16 is enabled but there is no GPU; DeepSpeed's fp16 needs CUDA. "
            "Use a bf16 or fp32 config on CPU (ds_configs/cpu_zero3.json)"
        )


def for_engine(cfg: dict[str, Any], world_size: int, run_dir: Path) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize: batch fields made consistent, monitors writing into
    the run folder (paths only; whether they are enabled stays the JSON's choice)."""
    tb, mb, ga = resolve_batch(cfg, world_size)
    out = {k: v for k, v in cfg.items() if k != "_source"}
    out.update(train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=ga)
    for mon in ("tensorboard", "csv_monitor"):
        if out.get(mon, {}).get("enabled"):
            out[mon] = {
                **out[mon],
                "output_path": str(run_dir / "monitor"),
                "job_name": out[mon].get("job_name", "train"),
            }
    return out

"""python -m roberta_ds.export --checkpoint <run or checkpoint dir> --out <dir>

Consolidates a (ZeRO-sharded) checkpoint into full fp32 weights and writes a Hugging Face
RobertaForMaskedLM folder with the run's tokenizer, which AutoModelForMaskedLM and
pipeline("fill-mask") load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from roberta_ds.config import ModelConfig, build_dataclass
from roberta_ds.errors import EXIT_BAD_INPUT, InputError
from roberta_ds.model import save_hf_state_dict
from roberta_ds.training.checkpoint import CheckpointError, resolve


class ExportError(CheckpointError):
    pass


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a checkpoint folder, whatever its ZeRO stage."""
    if list(ckpt.glob("zero_pp_rank_*_optim_states.pt")) or list(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # no ZeRO: the module states hold the full model
        sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent  # run_dir/checkpoints/step_*


def tokenizer_dir(run_dir: Path, run_cfg: dict) -> Path:
    """The run folder's own copy; runs from before it was kept fall back to the dataset's."""
    own = run_dir / "tokenizer"
    if own.is_dir():
        return own
    from roberta_ds.data.corpus import builtin_dataset_dir

    d = run_cfg["data"]
    dataset = d["dataset"]
    if isinstance(dataset, dict):  # a {folder: weight} mixture: its folders share one tokenizer
        dataset = next(iter(dataset))
    data_dir = (
        builtin_dataset_dir(d["cache_dir"], d["tokenizer"], d["vocab_size"], d["seq_len"])
        if dataset == "builtin"
        else Path(dataset)
    )
    if (data_dir / "tokenizer").is_dir():
        return data_dir / "tokenizer"
    raise ExportError(
        f"no tokenizer for {run_dir}: neither {own} nor {data_dir / 'tokenizer'} exists "
        "(a relative dataset path is read from the current folder: run export where training ran)"
    )


def export(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder `out`. It is written beside `out` and renamed into place, so an
    interrupted export leaves no half-written folder, and with `overwrite` the previous export stays
    whole until the new one is complete (and no stale file of it survives)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    ckpt = resolve(str(checkpoint), Path(checkpoint))
    run_dir = run_dir_of(ckpt)
    cfg_path = run_dir / "run_config.yaml"
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path} not found: export needs the run folder the checkpoint came from")
    run_cfg = yaml.safe_load(cfg_path.read_text())
    model_cfg = build_dataclass(ModelConfig, run_cfg["model"], f"{cfg_path}: model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(run_dir, run_cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf_state_dict(consolidated_state_dict(ckpt), model_cfg, tmp, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".old-{out.name}-{os.getpid()}"
    if out.exists():
        out.rename(old)  # from here until the next rename `out` is absent, never partial
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m roberta_ds.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--checkpoint", required=True, help="a run folder (its latest checkpoint) or a step_* folder"
    )
    ap.add_argument("--out", required=True, help="Hugging Face folder to write (new or empty)")
    ap.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (swapped in once complete)"
    )
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, overwrite=args.overwrite)
    except InputError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

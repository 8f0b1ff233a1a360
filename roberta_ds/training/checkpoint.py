"""Checkpoints: DeepSpeed's sharded states plus our client state, immutable once complete.

  run_dir/checkpoints/step_00000500/   DeepSpeed files (ZeRO shards), rng_rank*.pt, COMPLETE
  run_dir/checkpoints/latest           text: the tag of the newest complete checkpoint (written by
                                       rename, after every rank finished; DeepSpeed's own non-atomic
                                       'latest' is turned off)
  run_dir/checkpoints/universal/       DeepSpeed universal conversions (resuming on another world size)

Each save writes into a fresh hidden folder `.tmp-step_*-<id>`, adds COMPLETE (a JSON manifest: step,
model config, every file's size) and is renamed into `step_*` in one step, so a `step_*` folder is
complete and never written again: a save that finds its step complete does nothing, stale shards
of an interrupted save cannot mix with a new one, and a kill at any point leaves the last complete
checkpoint as it was. Pruning keeps the newest `keep_last` complete checkpoints (and their
universal conversions).

Resume is this module's alone, in two halves: `resolve_resume` (the resolve stage, before any
process group: which checkpoint, and is it this run's precision and model) and `Checkpointer.load`
(after the engine is built: a universal conversion when another world size saved it, then the load).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from roberta_ds.errors import InputError
from roberta_ds.training.distributed import all_agree, barrier, rank0_does

log = logging.getLogger("roberta_ds.train")

COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-"
# Settings that may change between the sessions of one run (how it runs, not what it trains).
RUNTIME_ONLY = {"kernels", "activation_checkpointing", "num_workers", "cache_dir"}


class CheckpointError(InputError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def manifest(path: Path) -> dict:
    """COMPLETE's content; {} for checkpoints written before it was a JSON manifest."""
    try:
        data = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _no_space_message(ckpt_root: Path, e: BaseException) -> str | None:
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    # torch's zip writer reports a full disk as "unexpected pos N vs M" (no errno)
    if any(getattr(c, "errno", None) == errno.ENOSPC or "unexpected pos" in str(c) for c in chain):
        free = shutil.disk_usage(ckpt_root).free / 2**20
        return (
            f"no space left on device while writing a checkpoint under {ckpt_root} ({free:.0f} MiB free); "
            "the previous checkpoints are intact: free some space, then run again to resume"
        )
    return None


def save(
    engine,
    run_dir: Path,
    step: int,
    client_state: dict,
    keep_last: int,
    rank: int,
    tag: str | None = None,
    make_latest: bool = True,
) -> Path:
    """Write checkpoint `tag` (default step_XXXXXXXX) for every rank; returns its folder.

    Called by every rank. A checkpoint already complete under that tag is left as it is.
    `make_latest=False` saves aside: `latest` does not move and nothing is pruned."""
    ckpt_root = run_dir / "checkpoints"
    tag = tag or tag_for(step)
    final = ckpt_root / tag

    def prepare_tmp():
        if is_complete(final):
            return None
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f"{TMP_PREFIX}*"):  # interrupted saves (the run lock is ours)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = ckpt_root / f"{TMP_PREFIX}{tag}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        return tmp.name

    tmp_name = rank0_does(prepare_tmp, CheckpointError)
    tmp_name = _broadcast(tmp_name)
    if tmp_name is None:
        return final  # complete already: immutable
    tmp = ckpt_root / tmp_name
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tmp_name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    except Exception as e:
        no_space = _no_space_message(ckpt_root, e)
        if no_space:  # leave now, sharing nothing: the other ranks may be inside DeepSpeed's own
            # barrier, which our all-reduce would not match (a hang under torchrun, issue 20). They
            # see this rank's connections close and read its verdict from EXIT_STATUS (train.py).
            if rank == 0:  # the partial save's space back (the others are leaving too)
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(no_space) from None
        failure = f"saving {final} failed: {type(e).__name__}: {e}"  # shared below: no rank waits
    if all_agree(failure is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(failure or f"saving {final} failed on another rank")
    if rank == 0:
        _finish(tmp, final, step, client_state)
        if make_latest:
            _point_latest(ckpt_root, tag)
            prune(ckpt_root, keep_last)
    barrier()
    return final


def _broadcast(value):
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _finish(tmp: Path, final: Path, step: int, client_state: dict) -> None:
    """COMPLETE (with a manifest of every file's size), then one rename into place."""
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    info = {
        "step": step,
        "model": client_state.get("config", {}).get("model"),
        "precision": client_state.get("precision"),
        "files": files,
    }
    try:
        (tmp / COMPLETE).write_text(json.dumps(info, indent=1) + "\n")
        if final.exists():  # an incomplete folder left by an older version: never resumed from
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_no_space_message(final.parent, e) or f"{final}: {e}") from None


def _point_latest(ckpt_root: Path, tag: str) -> None:
    tmp = ckpt_root / f".latest.tmp{os.getpid()}"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_root / "latest")  # atomic: readers see the old or the new tag


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete step_* checkpoints (0 = all) and the universal
    conversions of those; incomplete step folders are never counted as kept."""
    if keep_last <= 0:
        return
    complete = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and is_complete(p))
    kept = {p.name for p in complete[-keep_last:]}
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for conv in (ckpt_root / "universal").glob("step_*"):
        if conv.name not in kept:
            shutil.rmtree(conv, ignore_errors=True)


def resolve(path_or_auto: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: 'auto' = this run's latest (None if it has none);
    a run folder = its latest; a step_* folder = itself. Missing, incomplete or truncated ones
    are errors naming the folder or file."""
    if path_or_auto is None:
        return None
    if path_or_auto == "auto":
        if not (run_dir / "checkpoints" / "latest").is_file():
            return None
        path = run_dir
    else:
        path = Path(path_or_auto)
    if (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        path = path / tag
    if not path.is_dir():
        raise CheckpointError(f"checkpoint to resume from not found: {path}")
    looks_saved = path.name.startswith(("step_", "nonfinite_")) or any(path.glob("*.pt"))
    if not is_complete(path) and not looks_saved:
        raise CheckpointError(
            f"{path} holds no checkpoint (no checkpoints/latest, no {COMPLETE} manifest): pass a run "
            "folder that has saved, or one of its checkpoints/step_* folders"
        )
    if not is_complete(path):
        raise CheckpointError(
            f"{path}: incomplete or corrupt checkpoint (no {COMPLETE} marker; the save was "
            "interrupted) - resume from an earlier step_* folder"
        )
    for name, size in manifest(path).get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            got = f.stat().st_size if f.is_file() else "missing"
            raise CheckpointError(f"{f}: corrupt checkpoint file ({got} bytes, {size} when saved)")
    return path


def resolve_resume(
    resume: str | None, run_dir: Path, precision: str, ds_source: str, model: dict
) -> Path | None:
    """The checkpoint train.resume names (resolve), checked against this run before anything is
    built: its precision (check_precision) and its model config, field by field."""
    ckpt = resolve(resume, run_dir)
    if ckpt is not None:
        check_precision(ckpt, precision, ds_source)
        check_resume_model(ckpt, model)
    return ckpt


def checkpoint_model(ckpt: Path) -> dict | None:
    """The model config a checkpoint was trained with: its manifest, else its run's run_config.yaml."""
    model = manifest(ckpt).get("model")
    if model is None:
        import yaml

        saved = ckpt.parent.parent / "run_config.yaml"
        if saved.is_file():
            model = (yaml.safe_load(saved.read_text()) or {}).get("model")
    return model


def check_resume_model(ckpt: Path, model: dict) -> None:
    """Resuming needs the same architecture, field by field (shapes alone can match while the
    meaning differs, e.g. num_heads 4 -> 2 at one hidden size)."""
    saved = checkpoint_model(ckpt)
    if saved is None:
        return
    diff = [
        f"model.{k}: {saved[k]!r} in the checkpoint, {model.get(k)!r} now"
        for k in sorted(saved)
        if k not in RUNTIME_ONLY and saved[k] != model.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"{ckpt} was trained with another model config ({'; '.join(diff)}); resume it with "
            "its own config or start a new run"
        )


def needs_universal(ckpt: Path, world: int) -> bool:
    """ZeRO shards are per rank: a checkpoint saved by another world size loads through DeepSpeed's
    universal format (the engine's config says so: checkpoint.load_universal)."""
    saved = saved_world_size(ckpt)
    return bool(saved) and saved != world


def corrupt_file(ckpt: Path) -> Path | None:
    """The first .pt file of a checkpoint that is not a readable archive (named in errors)."""
    for f in sorted(ckpt.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                if z.testzip() is not None:
                    return f
        except (zipfile.BadZipFile, OSError):
            return f
    return None


def load(engine, ckpt: Path, rank: int, load_optimizer: bool = True) -> dict:
    try:
        path, client_state = engine.load_checkpoint(
            str(ckpt.parent),
            tag=ckpt.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=True,
        )
    except Exception as e:
        if isinstance(e, FileNotFoundError) and _other_precision_layout(ckpt, Path(e.filename or "")):
            raise CheckpointError(
                f"{ckpt} holds optimizer states of another precision ({Path(e.filename).name} is "
                f"missing): {PRECISION_HINT}"
            ) from None
        bad = corrupt_file(ckpt)
        where = f"{bad}: corrupt checkpoint file" if bad else f"{ckpt}: could not load"
        raise CheckpointError(f"{where} ({type(e).__name__}: {str(e)[:300]})") from None
    if path is None:
        raise CheckpointError(f"{ckpt}: DeepSpeed could not load this checkpoint")
    rng = ckpt / f"rng_rank{rank:05d}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved; steps reseed anyway
        set_rng_state(torch.load(rng, weights_only=False))
    return client_state


PRECISION_HINT = (
    "DeepSpeed cannot resume optimizer states saved in another precision; resume with a ds_config "
    "of the checkpoint's precision (the run folder's ds_config.json is the last one used) or start "
    "a new run folder"
)


def check_precision(ckpt: Path, precision: str, ds_source: str) -> None:
    """Before anything is built: the checkpoint's precision (in its manifest since it was recorded
    there) must be this run's, since DeepSpeed lays optimizer states out per precision (its bf16
    optimizer writes bf16_zero_pp_rank_* files) and fails deep inside loading otherwise."""
    saved = manifest(ckpt).get("precision")
    if saved and saved != precision:
        raise CheckpointError(
            f"{ckpt} was saved by a {saved} run and {ds_source} is {precision}: {PRECISION_HINT}"
        )


def _other_precision_layout(ckpt: Path, missing: Path) -> bool:
    """For checkpoints saved before the manifest recorded precision: the file DeepSpeed wants is
    absent but its bf16/non-bf16 twin (bf16_ prefix added or dropped) is there."""
    name = missing.name
    twin = name.removeprefix("bf16_") if name.startswith("bf16_") else f"bf16_{name}"
    return missing.parent == ckpt and (ckpt / twin).is_file()


def saved_world_size(ckpt: Path) -> int:
    """Data-parallel ranks that wrote a ZeRO checkpoint (one model-states file each); 0 without ZeRO."""
    return len(list(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")))


def to_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once; rank 0 converts and shares
    the outcome with every rank), so that it can be resumed on a different number of ranks."""
    out = ckpt.parent / "universal" / ckpt.name

    def convert():
        if out.is_dir():
            return
        import subprocess
        import sys

        tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt)]
        cmd += ["--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"{ckpt}: conversion to a universal checkpoint failed:\n{res.stderr[-2000:]}"
            )
        for f in ckpt.glob("rng_rank*.pt"):
            shutil.copy(f, tmp / f.name)
        tmp.rename(out)

    rank0_does(convert, CheckpointError)
    barrier()
    return out


class Checkpointer:
    """The run's checkpoints once the engine exists: when to save, save (then prune), load."""

    def __init__(self, run_dir: Path, save_every: int, keep_last: int, rank: int, world: int):
        self.run_dir, self.save_every, self.keep_last = run_dir, save_every, keep_last
        self.rank, self.world = rank, world

    def due(self, step: int, max_steps: int, nonfinite: int) -> bool:
        """A periodic save after this step? Never on a non-finite loss (nor would `latest` move
        there); the last step saves through the loop's own end."""
        return bool(self.save_every) and step % self.save_every == 0 and step < max_steps and not nonfinite

    def save(self, engine, step: int, state: dict, tag: str | None = None, make_latest: bool = True) -> Path:
        return save(engine, self.run_dir, step, state, self.keep_last, self.rank, tag, make_latest)

    def loadable(self, ckpt: Path) -> Path:
        """`ckpt` as this world loads it: converted once to DeepSpeed's universal format when another
        world size saved it (the engine is configured for that by resolve). Called before the engine
        is built, so that the conversion's host memory never adds to the engine's."""
        if not needs_universal(ckpt, self.world):
            return ckpt
        out = to_universal(ckpt)
        if self.rank == 0:
            log.info(f"resuming a {saved_world_size(ckpt)}-rank checkpoint on {self.world} ranks via {out}")
        return out

    def load(self, engine, ckpt: Path) -> dict:
        """The client state of `ckpt` (as `loadable` gave it) after loading it into `engine`."""
        return load(engine, ckpt, self.rank)

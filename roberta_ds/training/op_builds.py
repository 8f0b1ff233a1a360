"""DeepSpeed's C++ ops, built once per virtualenv and never waited on forever.

DeepSpeed compiles its C++ ops just in time on first use (on CPU: the shared-memory collectives,
~60 s, and CPU Adam for offload configs, ~100 s, on a 2-core host) through torch's cpp_extension,
which guards each build folder with a `lock` file that it creates and deletes. A build killed
part-way (torchrun's SIGKILL 30 s after a Ctrl-C, a scheduler's kill, the OOM killer) leaves that
file, and every later load of the op then sleeps on it forever, printing nothing. Here:

- ops build into a folder owned by the virtualenv (`<sys.prefix>/torch_extensions`, unless
  TORCH_EXTENSIONS_DIR is set), so two virtualenvs never rebuild one folder over each other;
- `scripts/setup.sh` builds them before any run (`python -m roberta_ds.training.op_builds`);
- every build or load of ours runs under an flock on `<folder>/.build.lock`. The kernel releases an
  flock when its holder dies, so while we hold it no live builder of ours exists, and a torch `lock`
  file found then is a dead build's: it is removed, with a warning naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("roberta_ds.op_builds")

# What each op is for; DeepSpeed's builder class names (accelerator.create_op_builder).
OPS = {"shm_comm": "ShareMemCommBuilder", "cpu_adam": "CPUAdamBuilder"}


def extensions_dir() -> Path:
    """The folder torch's cpp_extension builds into: the virtualenv's by default (set in the
    environment, so DeepSpeed's own loads inside deepspeed.initialize use it too). A Python that
    is no virtualenv and cannot be written keeps torch's default (~/.cache/torch_extensions).
    Called before any op loads, so it also puts this Python's ninja first on PATH (below)."""
    _own_ninja_first()
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        if sys.prefix != sys.base_prefix or os.access(sys.prefix, os.W_OK):
            os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
        else:
            from torch.utils.cpp_extension import get_default_build_root

            os.environ["TORCH_EXTENSIONS_DIR"] = get_default_build_root()
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _own_ninja_first() -> None:
    """torch's cpp_extension runs the first `ninja` on PATH, also just to load an op already built.
    The virtualenv has its own (pip's, a DeepSpeed dependency), and a system one may differ in
    version: ninja 1.13 and 1.11 record a build's command differently, so each takes the other's
    build for a changed command and rebuilds (seen here: ~40 s for shm_comm on 2 cores each time a
    run from the activated virtualenv followed `.venv/bin/python train.py` or the reverse), and
    with no system ninja an unactivated run cannot load the op at all. The interpreter's folder
    goes first on PATH where it holds a ninja."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def build_guard():
    """Hold the folder's build flock, clearing batons left by builds that died."""
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "a+") as f:
        # The ranks of a node come here together and load in ~1 s each: only a longer wait (a
        # live build of ours; a dead builder's flock is gone) is worth a message.
        deadline = time.monotonic() + 5
        while not _try_lock(f) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _try_lock(f):
            f.seek(0)
            log.warning(
                "waiting for process %s, which is building DeepSpeed's ops in %s",
                f.read().strip() or "?",
                root,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.truncate(0)
            f.write(f"{os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            for baton in root.glob("*/lock"):
                log.warning("removing %s, left by a build of %s that was killed", baton, baton.parent.name)
                baton.unlink(missing_ok=True)
            yield root
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def needed_ops(offload: bool = False) -> list[str]:
    """The ops a run on this machine loads: shm_comm for gloo on CPU, cpu_adam for offload."""
    import torch

    ops = [] if torch.cuda.is_available() else ["shm_comm"]
    return ops + (["cpu_adam"] if offload else [])


def ensure_built(ops: list[str]) -> None:
    """Build (or just load, when built) each op under the guard. An op this machine cannot build
    is left to DeepSpeed, which falls back (shm_comm) or raises its own error (cpu_adam)."""
    extensions_dir()  # even with nothing to build here: DeepSpeed's later JIT loads land there too
    if not ops:
        return
    with build_guard():
        from deepspeed.accelerator import get_accelerator

        for op in ops:
            builder = get_accelerator().create_op_builder(OPS[op])
            if builder is None or not builder.is_compatible(verbose=False):
                continue
            builder.load(verbose=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build DeepSpeed's C++ ops into the virtualenv (set-up).")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {sorted(OPS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        ap.error(f"unknown op {unknown[0]!r} (ops: {', '.join(sorted(OPS))})")
    import torch

    if torch.cuda.is_available():
        ops = [o for o in ops if o != "shm_comm"]  # NCCL there, not DeepSpeed's CPU collectives
    ensure_built(ops)
    print(f"op_builds: {', '.join(ops) or 'nothing'} ready in {extensions_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

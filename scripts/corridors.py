"""How far a reader walks to follow a run from train.py to its first step (issue 19's measure).

Runs train.py in this process (one rank, resuming a two-step run made first in a subprocess) under
sys.setprofile and records each project function at its first call: a reader reads a function once.
Two counts: the setup (up to the first training step) and the whole run. The stops are those
first calls in order, in the application's files (train.py and roberta_ds/, without
roberta_ds/model/, whose forward is the model's, not the run's corridor). It prints:

  stops     functions read, in order
  files     distinct files visited
  returns   stops that come back to a file already left (A -> B -> A counts one)
  climbs    returns to a file of a higher layer (entry > training > data/config/errors)

  python scripts/corridors.py [--config C] [--deepspeed_config D] [--list]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"train.py": 0, "roberta_ds/training": 1}  # everything else in roberta_ds: 2


def layer(rel: str) -> int:
    return next((v for k, v in LAYER.items() if rel.startswith(k)), 2)


def walk(argv: list[str]) -> list[tuple[str, str]]:
    """[(file relative to the repository, function)] at first call, during train.main(argv)."""
    seen, stops = set(), []
    app = (str(ROOT / "train.py"), str(ROOT / "roberta_ds") + os.sep)
    skip = str(ROOT / "roberta_ds" / "model") + os.sep

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        f = code.co_filename
        if not f.startswith(app) or f.startswith(skip) or code.co_name.startswith("<"):
            return
        key = (f, code.co_firstlineno)
        if key not in seen:
            seen.add(key)
            if not code.co_flags & inspect.CO_OPTIMIZED:
                return  # a class body run by an import, not a call
            stops.append((os.path.relpath(f, ROOT), code.co_qualname))

    sys.path.insert(0, str(ROOT))
    import train

    sys.setprofile(profile)
    try:
        train.main(argv)
    finally:
        sys.setprofile(None)
    return stops


def measure(stops: list[tuple[str, str]]) -> dict:
    left, prev, returns, climbs = set(), None, 0, 0
    for f, _ in stops:
        if f != prev:
            if f in left:
                returns += 1
                climbs += prev is not None and layer(f) < layer(prev)
            if prev is not None:
                left.add(prev)
            prev = f
    return {"stops": len(stops), "files": len({f for f, _ in stops}), "returns": returns, "climbs": climbs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    ap.add_argument("--deepspeed_config", default=str(ROOT / "ds_configs" / "cpu_zero1.json"))
    ap.add_argument("--list", action="store_true", help="print every stop")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--config", args.config, "--deepspeed_config", args.deepspeed_config, "--run_dir", tmp]
        # a run to resume, with a checkpoint, in its own process (the run folder's lock is per process)
        first = [sys.executable, str(ROOT / "train.py"), *common, "--max_steps", "2"]
        subprocess.run(first, check=True, stdout=sys.stderr)
        stops = walk(common + ["--max_steps", "3", "--resume", "auto"])
    if args.list:
        for f, fn in stops:
            print(f"{f}:{fn}")
    # the setup: up to the first training step (the loop's own functions are not the corridor)
    first_step = next((i for i, (_, fn) in enumerate(stops) if fn.endswith("_train_step")), len(stops))
    print("setup (train.py to the first step):", measure(stops[:first_step]))
    print("whole run (setup, 3 steps, validation, checkpoint):", measure(stops))


if __name__ == "__main__":
    main()

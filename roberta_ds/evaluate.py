"""python -m roberta_ds.evaluate RUN_OR_HF_FOLDER [--json out.json] [--glue rte,mrpc,...]

The offline quality gate (no network): held-out MLM loss and masked accuracy (run folders), cloze
top-1/top-5 on content words of held-out built-in-corpus sentences, and a 3-class 'which source'
probe (linear on frozen features, and a short fine-tune), each beside a random-init model of the
same config. `--glue` adds GLUE fine-tuning (needs `datasets` to reach the Hub; median of seeds).
Prints tables and writes JSON (default <folder>/evaluation.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from roberta_ds.errors import EXIT_BAD_INPUT, InputError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m roberta_ds.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("folder", help="a run folder (latest checkpoint) or an exported Hugging Face folder")
    ap.add_argument("--json", help="where to write the results (default <folder>/evaluation.json)")
    ap.add_argument(
        "--cloze", type=int, default=300, help="number of cloze sentences (half Bible, half docs)"
    )
    ap.add_argument(
        "--finetune-seeds", type=int, default=1, help="fine-tune runs on the source task (0: skip)"
    )
    ap.add_argument(
        "--finetune-lr", type=float, help="default by width: 1e-3 up to hidden 256 (tiny), else 2e-5"
    )
    ap.add_argument("--glue", default="", help="comma-separated GLUE tasks: rte,mrpc,cola,stsb,sst2")
    ap.add_argument("--glue-seeds", type=int, default=5)
    ap.add_argument("--glue-lr", type=float, help="default as --finetune-lr")
    args = ap.parse_args(argv)
    from roberta_ds.evaluation import gate

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"evaluate: error: {folder} is not a folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        res = gate.run(folder, args.cloze, args.finetune_seeds, finetune_lr=args.finetune_lr)
        if args.glue:
            from roberta_ds.evaluation.finetune import run_glue

            hf = folder / "hf" if (folder / "run_config.yaml").is_file() else folder
            if not (hf / "config.json").is_file():
                raise InputError(f"--glue needs a Hugging Face folder: export the run to {hf} first")
            res["glue"] = run_glue(str(hf), args.glue.split(","), args.glue_seeds, lr=args.glue_lr)
    except InputError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.json) if args.json else folder / "evaluation.json"
    out.write_text(json.dumps(res, indent=1))
    print(gate.format_report(res))
    for task, g in res.get("glue", {}).items():
        print(f"GLUE {task}: {g['metric']} median {g['median']:.4f} over {len(g['scores'])} seeds")
    print(f"evaluate: {res['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OUT/SUMMARY.md for scripts/gpu_suite.sh, built from whatever the stages left under OUT/<stage>/.

Usage: python roberta_ds/benchmarks/suite_summary.py OUT STAGE [STAGE ...]
Each stage gets a heading with its status (done, failed with its exit code, skipped with the reason
in NOTE, or not run), the tail of its log when it did not finish, and a table per CSV/JSON result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path

MAX_ROWS = 40
MAX_COLS = 12


def _fmt(v) -> str:
    if isinstance(v, str) and "." in v:  # CSV numbers arrive as text
        with contextlib.suppress(ValueError):
            v = float(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "")


def _table(rows: list[dict]) -> list[str]:
    """A markdown table; columns equal in every row (device, versions, commit) go on one line above."""
    rows = [r for r in rows if isinstance(r, dict)][:MAX_ROWS]
    if not rows:
        return []
    cols = [
        c for c in dict.fromkeys(k for r in rows for k in r) if not isinstance(rows[0].get(c), dict | list)
    ]
    same = [c for c in cols if len(rows) > 1 and len({_fmt(r.get(c)) for r in rows}) == 1]
    cols = [c for c in cols if c not in same][:MAX_COLS]
    return [
        *(["all rows: " + ", ".join(f"{c} {_fmt(rows[0].get(c))}" for c in same), ""] if same else []),
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows),
    ]


def _results(path: Path) -> list[str]:
    if path.suffix == ".csv":
        with path.open() as f:
            rows = list(csv.DictReader(f))
    else:
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else [data]
    lines = _table(rows)
    return [f"`{path.name}`:", "", *lines, ""] if lines else []


def stage_section(out: Path, stage: str) -> list[str]:
    d = out / stage
    if (d / "DONE").exists():
        status = "done"
    elif (d / "NOTE").exists():
        status = "skipped: " + (d / "NOTE").read_text().strip()
    elif (d / "rc").exists():
        status = f"failed (exit {(d / 'rc').read_text().strip()}; 124 = stage time limit)"
    else:
        status = "not run"
    lines = [f"## {stage}", "", f"Status: {status}", ""]
    if not d.is_dir():
        return lines
    seconds = d / "seconds"
    if seconds.exists():
        lines += [f"Time: {seconds.read_text().strip()} s", ""]
    files = sorted(p.name for p in d.iterdir() if p.is_file())
    lines += ["Files: " + ", ".join(f"`{f}`" for f in files), ""]
    if status != "done" and (d / "log.txt").exists():
        tail = (d / "log.txt").read_text(errors="replace").splitlines()[-15:]
        lines += ["```", *tail, "```", ""]
    for p in sorted(d.iterdir()):
        if p.suffix in (".csv", ".json") and p.is_file():
            try:
                lines += _results(p)
            except (ValueError, csv.Error) as e:
                lines += [f"`{p.name}`: unreadable ({e})", ""]
    lines += [f"![{p.stem}]({stage}/{p.name})" for p in sorted(d.glob("*.png"))]
    return lines + [""]


def main(argv: list[str]) -> int:
    out, stages = Path(argv[0]), argv[1:]
    env = out / "env" / "env.json"
    head = json.loads(env.read_text()) if env.exists() else {}
    lines = ["# GPU suite summary", ""]
    if head:
        lines += [", ".join(f"{k} {v}" for k, v in head.items() if isinstance(v, str | int | float)), ""]
    for stage in stages:
        lines += stage_section(out, stage)
    (out / "SUMMARY.md").write_text("\n".join(lines))
    print(f"wrote {out / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

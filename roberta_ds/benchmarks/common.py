"""Benchmark bookkeeping shared by roberta_ds.bench and kernel_tools.bench: what ran where, appended
to CSV rows so results from different machines and commits can sit in one file."""

from __future__ import annotations

import csv
import datetime
import platform
import subprocess
from pathlib import Path

import torch


def git_commit(paths: tuple[str, ...] = ()) -> str:
    """HEAD's short hash, "-dirty" when tracked files (under `paths`, if given) differ from it."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict[str, str]:
    import triton

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        cuda = torch.version.cuda or ""
    else:
        device = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
        cuda = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": cuda,
        "commit": git_commit(),
    }


def append_csv(path: str | Path, rows: list[dict]) -> Path:
    """Append rows (union of keys as columns; a new file gets a header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    if path.exists():
        with path.open() as f:
            header = next(csv.reader(f), [])
        fields = header + [k for k in fields if k not in header]
        if fields != header:  # new columns: rewrite with the wider header
            with path.open() as f:
                old = list(csv.DictReader(f))
            rows = old + rows
            path.unlink()
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)

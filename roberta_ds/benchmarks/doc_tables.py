"""The docs quote benchmark outputs by inclusion, never by hand. In README.md and docs/*.md, the
lines between

    <!-- include: bench_results/data_100mb.md -->
    <!-- end include -->

are that file's text as its benchmark last wrote it. A benchmark that writes a .md calls sync()
after, so a re-measurement is one command; `python -m roberta_ds.benchmarks.doc_tables --check`
(and tests/test_docs.py) fails when a doc quotes an older output.
"""

from __future__ import annotations

import argparse
import re
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = re.compile(
    r"(?P<open><!-- include: (?P<path>\S+) -->\n)(?P<body>.*?)(?P<close><!-- end include -->)", re.S
)


class IncludeError(ValueError):
    pass


def docs(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(text: str, root: Path, where: Path) -> str:
    """`text` with every include region's body replaced by its file's current text."""

    def body(m: re.Match) -> str:
        src = root / m["path"]
        if not src.is_file():
            raise IncludeError(f"{where}: includes {m['path']}, which does not exist")
        content = src.read_text()
        return m["open"] + content + ("" if content.endswith("\n") else "\n") + m["close"]

    return INCLUDE.sub(body, text)


def sync(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Bring every doc's include regions up to date (or, with check, only list the stale docs)."""
    stale = []
    for doc in docs(root):
        if not doc.is_file():
            continue
        text = doc.read_text()
        new = render(text, root, doc)
        if new != text:
            stale.append(doc)
            if not check:
                doc.write_text(new)
    return stale


def publish(path: Path, text: str) -> Path:
    """Write a benchmark's markdown output, then bring the docs that include it up to date; an output
    outside the repository (a test's) leaves the docs alone."""
    path = Path(path)
    path.write_text(text)
    if path.resolve().is_relative_to(ROOT):
        sync()
    return path


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def half_up(value, digits: int = 0, scale: int | str = 1) -> str:
    """`value` (a number or its CSV text) times `scale`, rounded half up at `digits` decimals, in decimal
    as a person rounds the written figure: the outputs hold decimals already rounded, and binary
    rounding turns 38.15 into 38.1 and 0.345 x 100 into 34."""
    exact = Decimal(str(value)) * Decimal(str(scale))
    return str(exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m roberta_ds.benchmarks.doc_tables", description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if a doc quotes an older output")
    args = ap.parse_args(argv)
    try:
        stale = sync(check=args.check)
    except IncludeError as e:
        print(f"doc_tables: error: {e}", file=sys.stderr)
        return 2
    for doc in stale:
        print(f"{doc.relative_to(ROOT)}: {'out of date' if args.check else 'updated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""The progress line of a prepare: bytes, documents, tokens/s and ETA across all tasks of a stage.

Read from the files the tasks leave (completed manifests, in-flight progress.json), so it also
counts the work of other processes on the same folder (array tasks, a second prepare).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from roberta_ds.data import tasks as T


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


class Progress:
    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = out, enabled
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def start(self, stage: str, tasks, todo) -> None:
        self.stage, self.tasks = stage, {t.index: t for t in todo}
        self.total = sum(t.size for t in todo)
        self.done: dict[int, tuple[int, int, int]] = {}  # index -> (bytes, documents, tokens)
        self.t0 = time.time()
        self.skipped = len(tasks) - len(todo)
        self.update(force=True)

    def _counts(self) -> tuple[int, int, int, int]:
        for i, t in self.tasks.items():
            if i in self.done:
                continue
            folder = T.task_dir(self.out, i)
            if self.stage == "tokenize" and (folder / "manifest.json").is_file():
                m = json.loads((folder / "manifest.json").read_text())
                self.done[i] = (t.size, m["documents"], m["tokens"])
            elif self.stage == "sample" and T.sample_file(self.out, i).exists():
                self.done[i] = (t.size, 0, 0)
        b, d, n = (sum(x) for x in zip(*self.done.values())) if self.done else (0, 0, 0)
        for p in (self.out / "tasks").glob("*.tmp-*/progress.json"):
            try:
                q = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # replaced or removed while read
            b, d, n = b + q["bytes"], d + q["documents"], n + q["tokens"]
        return len(self.done), b, d, n

    def update(self, force: bool = False) -> None:
        if not self.enabled or not self.tasks:
            return
        now = time.time()
        if not force and now - self.last_print < (1 if self.tty else 30):
            return
        self.last_print = now
        k, b, d, n = self._counts()
        dt = max(now - self.t0, 1e-9)
        eta = f"{(self.total - b) / (b / dt):,.0f}s" if b else "?"
        line = (
            f"prepare {self.stage}: tasks {k}/{len(self.tasks)} (+{self.skipped} done before), "
            f"{_mb(b)}/{_mb(self.total)}, {d:,} docs, {n / dt:,.0f} tokens/s, ETA {eta}"
        )
        print(line, end="\r" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tasks:
            self.update(force=True)
            if self.tty:
                print(file=sys.stderr)

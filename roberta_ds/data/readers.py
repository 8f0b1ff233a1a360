"""Inputs of prepare: listing, cutting into deterministic tasks, and reading a task's documents.

A task is one input file, or one byte range of a large plain text/JSONL file cut at a document
boundary (a line start for JSONL, a blank line for text), or one compressed/Parquet file, or one
`datasets` hub name. The task list depends only on the inputs and `task_bytes`, never on the
number of workers, so every partition of the work produces the same tasks (and the same dataset).

JSONL and text are read here line by line in bounded memory (one document at a time), which makes
byte ranges and line numbers in error messages natural; Parquet through pyarrow batches; a hub
name through `datasets` streaming.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from roberta_ds.errors import InputError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
COMPRESSED = {".gz": "gz", ".zst": "zst", ".zstd": "zst", ".xz": "xz"}


class PrepareError(InputError):
    """A bad input to prepare; the message names the file (and line) or value."""


@dataclass(frozen=True)
class Task:
    index: int
    kind: str  # text | json | parquet | hub
    source: str  # file path or hub name
    compression: str | None = None  # gz | zst | xz
    start: int = 0  # byte range [start, end) of a plain file; end -1: to the end
    end: int = -1
    size: int = 0  # input bytes this task reads (compressed bytes for compressed files)

    def as_dict(self) -> dict:
        return asdict(self)


def kind_of(path: Path) -> tuple[str | None, str | None]:
    """(kind, compression) from the suffixes: data.jsonl.zst -> ('json', 'zst')."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = COMPRESSED.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if comp and len(suffixes) > 1 else (None if comp else (suffixes or [None])[-1])
    for kind, known in (("text", TEXT_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if inner in known:
            return kind, comp
    return None, comp


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def list_inputs(inputs: list[str], skipped_binary: list[str]) -> list[tuple[str, str, str | None]]:
    """(kind, path-or-hub-name, compression) for every input; folders are walked in sorted order.
    An explicit binary file is an error; binary files inside folders are skipped and listed."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and kind_of(f)[0])
            if not files:
                raise PrepareError(
                    f"{p}: folder has no text/JSONL/Parquet files (.txt .jsonl .parquet, .gz .zst .xz)"
                )
            for f in files:
                kind, comp = kind_of(f)
                if kind == "text" and not comp and _is_binary(f):
                    skipped_binary.append(str(f))
                    continue
                out.append((kind, str(f), comp))
        elif p.is_file():
            kind, comp = kind_of(p)
            kind = kind or "text"
            if kind == "text" and not comp and _is_binary(p):
                raise PrepareError(f"{p}: looks like a binary file (NUL bytes), not text")
            out.append((kind, str(p), comp))
        elif not _looks_like_hub_name(item):
            raise PrepareError(f"input not found: {item} (no such file or folder under {Path.cwd()})")
        else:
            out.append(("hub", item, None))  # 'owner/name': a datasets hub name, where a network exists
    return out


def _looks_like_hub_name(item: str) -> bool:
    """'owner/name' and nothing local by that name: a missing relative folder such as
    'corpus/wiki' (whose 'corpus' exists here) or 'corpus/' is an error, never a Hub request."""
    parts = item.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not Path(parts[0]).exists()
        and not Path(item).suffix
        and not item.startswith((".", "~"))
    )


def plan_tasks(files: list[tuple[str, str, str | None]], task_bytes: int) -> list[Task]:
    """Cut the inputs into tasks: plain text/JSONL files larger than task_bytes into ranges of about
    task_bytes ending at a document boundary, everything else one task per input."""
    tasks: list[Task] = []
    for kind, src, comp in files:
        if kind == "hub":
            tasks.append(Task(len(tasks), kind, src))
            continue
        size = Path(src).stat().st_size
        cuts = [0, size] if comp or kind == "parquet" else _cuts(Path(src), kind, size, task_bytes)
        for a, b in zip(cuts, cuts[1:]):
            end = b if (kind in ("text", "json") and not comp) else -1
            tasks.append(Task(len(tasks), kind, src, comp, a, end, b - a))
    return tasks


def _cuts(path: Path, kind: str, size: int, task_bytes: int) -> list[int]:
    """Range boundaries [0, c1, ..., size]: each ci the first document boundary at or after
    i * task_bytes (a line start for JSONL; for text a line start whose line is blank)."""
    cuts = [0]
    with path.open("rb") as f:
        for nominal in range(task_bytes, size, task_bytes):
            pos = max(nominal, cuts[-1])
            if pos >= size:
                break
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # finish the line holding byte pos - 1
            while kind == "text" and pos < size:
                line = f.readline()
                if not line.strip():
                    break  # a blank line: a document never spans it
                pos += len(line)
            if cuts[-1] < pos < size:
                cuts.append(pos)
    return cuts + [size]


# --------------------------------------------------------------------------------------------
# Reading one task


class TaskReader:
    """Documents of one task, in input order. `bytes_read` is the progress in the task's input;
    `empty` and `replaced` count empty documents and U+FFFD characters (non-UTF-8 bytes)."""

    def __init__(self, task: Task, text_field: str):
        self.task, self.text_field = task, text_field
        self.bytes_read = self.empty = self.replaced = 0
        self.line = 0  # line (or row) number inside the task, for error messages

    def documents(self) -> Iterator[str]:
        t = self.task
        try:
            if t.kind == "parquet":
                yield from self._parquet()
            elif t.kind == "hub":
                yield from self._hub()
            elif t.kind == "json":
                yield from self._json()
            else:
                yield from self._text()
        except PrepareError:
            raise
        except (OSError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
            raise PrepareError(f"{self._where()}: could not read ({t.compression or t.kind}): {e}") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError" or t.kind in ("hub", "parquet"):
                what = "as a datasets hub name" if t.kind == "hub" else f"as {t.compression or t.kind}"
                raise PrepareError(
                    f"{self._where()}: could not read {what}: {type(e).__name__}: {e}"
                ) from None
            raise

    def _where(self) -> str:
        """'file:line' with the line counted from the start of the file (only on the error path)."""
        t = self.task
        if t.kind in ("hub", "parquet"):
            return f"{t.source}: row {self.line}"
        first = 1
        if t.start and not t.compression:
            with open(t.source, "rb") as f:
                left = t.start
                while left > 0:
                    chunk = f.read(min(left, 1 << 24))
                    first += chunk.count(b"\n")
                    left -= len(chunk)
        return f"{t.source}:{first + self.line - 1}"

    def _lines(self) -> Iterator[bytes]:
        t = self.task
        with open(t.source, "rb") as raw:
            if t.compression:
                stream = io.BufferedReader(_decompressor(raw, t.compression), 1 << 20)
                for line in stream:
                    self.line += 1
                    self.bytes_read = raw.tell()
                    yield line
                return
            raw.seek(t.start)
            pos, end = t.start, (t.end if t.end >= 0 else float("inf"))
            while pos < end:
                line = raw.readline()
                if not line:
                    return
                pos += len(line)
                self.line += 1
                self.bytes_read = pos - t.start
                yield line

    def _decode(self, data: bytes) -> str:
        text = data.decode("utf-8", errors="replace")
        self.replaced += text.count("\ufffd")
        return text

    def _text(self) -> Iterator[str]:
        """Documents are separated by blank lines (fairseq's convention)."""
        doc: list[bytes] = []
        for line in self._lines():
            if line.strip():
                doc.append(line)
            elif doc:
                yield self._decode(b"".join(doc)).rstrip("\r\n")
                doc = []
        if doc:
            yield self._decode(b"".join(doc)).rstrip("\r\n")

    def _json(self) -> Iterator[str]:
        for line in self._lines():
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise PrepareError(
                    f"{self._where()}: not a JSON object: {e.msg} (column {e.colno})"
                ) from None
            yield from self._field(row)

    def _field(self, row) -> Iterator[str]:
        if not isinstance(row, dict) or self.text_field not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise PrepareError(
                f"{self._where()}: no {self.text_field!r} field (fields: {fields}); pass --text-field"
            )
        text = row[self.text_field]
        if not isinstance(text, str) or not text.strip():
            self.empty += 1
            return
        self.replaced += text.count("\ufffd")
        yield text

    def _parquet(self) -> Iterator[str]:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(self.task.source)
        if self.text_field not in f.schema_arrow.names:
            raise PrepareError(
                f"{self.task.source}: no {self.text_field!r} column (columns: {f.schema_arrow.names}); "
                "pass --text-field"
            )
        for batch in f.iter_batches(batch_size=1024, columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                self.line += 1
                yield from self._field({self.text_field: text})
        self.bytes_read = self.task.size

    def _hub(self) -> Iterator[str]:
        import datasets

        datasets.disable_progress_bars()
        for row in datasets.load_dataset(self.task.source, split="train", streaming=True):
            self.line += 1
            yield from self._field(row)


def _decompressor(raw, compression: str):
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == "xz":
        return lzma.LZMAFile(raw)
    try:
        import zstandard
    except ImportError:
        raise PrepareError("reading .zst files needs the zstandard package: pip install zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)

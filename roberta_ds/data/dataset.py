"""PackedDataset: memory-maps a prepared folder's shards and serves fixed-length blocks.

Block i = <s> + stream[i*L : (i+1)*L] + </s>, L = seq_len - 2; the last block of a split is padded.
`segment_ids` number the documents inside a block (for the document attention mask).

`seq_len` below the prepared one serves shorter blocks cut from the same token stream (sequence-length
warmup): with 512-token prepared blocks and seq_len 128, block i holds stream tokens [126 i, 126 (i+1)),
so no token is dropped and a short block may span two prepared blocks (or two shards).
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
        hint = (
            " (an unfinished prepare leaves only a .tmp folder)"
            if folder.with_name(folder.name + ".tmp").exists()
            else ""
        )
        raise DatasetError(
            f"dataset not found: {meta_path} does not exist{hint}; run `python -m roberta_ds.prepare`"
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta_path}: corrupt metadata (line {e.lineno}): {e.msg}") from None


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
        dtype = np.dtype(self.meta["dtype"])
        self.shards = []
        for s in info["shards"]:
            path = self.folder / s["file"]
            if not path.is_file() or path.stat().st_size != s["num_tokens"] * dtype.itemsize:
                raise DatasetError(f"{path}: missing or truncated shard (expected {s['num_tokens']} tokens)")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(s["num_tokens"],)))
        # Every shard but the split's last holds blocks_per_shard whole prepared blocks.
        self.shard_tokens = info["blocks_per_shard"] * (self.meta["seq_len"] - 2)
        self.doc_offsets = np.load(self.folder / info["doc_offsets"])

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        L = self.block_tokens
        body = self._stream(i * L, min((i + 1) * L, self.num_tokens))
        ids = np.full(self.seq_len, self.pad, dtype=np.int64)
        ids[0] = self.bos
        ids[1 : 1 + len(body)] = body
        ids[1 + len(body)] = self.eos
        # Document number of each token: how many documents started at or before its stream offset.
        start = i * L
        seg = np.zeros(self.seq_len, dtype=np.int64)
        seg[1 : 1 + len(body)] = np.searchsorted(self.doc_offsets, start + np.arange(len(body)), side="right")
        seg[0] = seg[1] if len(body) else 0
        seg[1 + len(body) :] = seg[len(body)] if len(body) else 0
        seg -= seg[0]
        return {"input_ids": torch.from_numpy(ids), "segment_ids": torch.from_numpy(seg)}

    def _stream(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the split's stream as int64, across a shard boundary if need be."""
        parts = []
        while a < b:
            shard, off = divmod(a, self.shard_tokens)
            n = min(b - a, self.shard_tokens - off)
            parts.append(self.shards[shard][off : off + n])
            a += n
        return np.concatenate(parts, dtype=np.int64) if parts else np.zeros(0, dtype=np.int64)

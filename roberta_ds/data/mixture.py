"""Several prepared datasets mixed with weights, and one dataset at several block lengths.

Mixing: positions are dealt in periods of PERIOD samples; in each period dataset k gets exactly
n_k = w_k x PERIOD slots (largest remainder, so they sum to PERIOD), spread by a permutation seeded by
(seed, period). Dataset k's own position is then q = period x n_k + (its slots earlier in the period),
so (k, q) is a pure function of (seed, position) in O(PERIOD) once per period, proportions are exact
to 1/PERIOD over every period, and a small dataset simply comes round more often (its own epochs).
Megatron's BlendableDataset reaches the same proportions with a sequential greedy pass, which a
resume would have to replay; this needs none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from roberta_ds.data.dataset import DatasetError, PackedDataset, read_metadata
from roberta_ds.data.sampler import BlockOrder

PERIOD = 10_000  # weights resolve to 1e-4; one period's tables are 2 x 80 kB


def slot_counts(weights: list[float], period: int = PERIOD) -> list[int]:
    """Integer slots per dataset summing to `period`, proportional to the weights (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights) * period
    counts = np.floor(w).astype(np.int64)
    for k in np.argsort(-(w - counts), kind="stable")[: period - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


class MixtureSlots:
    """u -> (dataset k, k's own position q); a pure function of (seed, u)."""

    def __init__(self, weights: list[float], seed: int, period: int = PERIOD):
        self.counts, self.seed, self.period = slot_counts(weights, period), seed, period
        self._period_no, self._k, self._rank = -1, None, None

    def _tables(self, period_no: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + period_no + 7_919)
        perm = torch.randperm(self.period, generator=g).numpy()
        k_P = np.repeat(np.arange(len(self.counts)), self.counts)[perm]  # dataset of each slot
        order = np.argsort(k_P, kind="stable")  # slots grouped by dataset, in period order
        first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        rank_P = np.empty(self.period, dtype=np.int64)
        rank_P[order] = np.arange(self.period) - first[k_P[order]]
        self._period_no, self._k, self._rank = period_no, k_P, rank_P

    def __call__(self, u: int) -> tuple[int, int]:
        period_no, j = divmod(u, self.period)
        if period_no != self._period_no:
            self._tables(period_no)
        k = int(self._k[j])
        return k, period_no * self.counts[k] + int(self._rank[j])


class Catalog(torch.utils.data.Dataset):
    """Views (PackedDatasets) behind one index: view v's block i is offsets[v] + i."""

    def __init__(self, views: list[PackedDataset]):
        self.views = views
        self.offsets = np.cumsum([0] + [len(v) for v in views])
        self.pad = views[0].pad

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.views[v][i - int(self.offsets[v])]


class RoundRobin(torch.utils.data.Dataset):
    """Validation over several datasets with equal weight: item i is dataset i % K's block (i // K)."""

    def __init__(self, views: list[PackedDataset]):
        self.views, self.pad = views, views[0].pad

    def __len__(self) -> int:
        return len(self.views) * max(len(v) for v in self.views)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        view = self.views[i % len(self.views)]
        return view[(i // len(self.views)) % len(view)]


def tokenizer_identity(folder: Path, meta: dict) -> str:
    """What makes two tokenizers the same: vocabulary, merges and added tokens of tokenizer.json.
    metadata.json's sha256 hashes the files' bytes, which a save_pretrained round trip changes
    (null vs "" options, extra config keys) when a dataset is prepared with another's tokenizer
    folder; it is the fallback when there is no tokenizer.json."""
    path = folder / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        return str(meta["tokenizer"].get("sha256"))
    tok = json.loads(path.read_text())
    added = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))
    content = [tok["model"].get("vocab"), tok["model"].get("merges"), added]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def check_compatible(folders: list[Path]) -> dict:
    """Datasets mixed in one run must share the tokenizer and the block length; returns the first's
    metadata."""
    metas = [read_metadata(f) for f in folders]
    first = (tokenizer_identity(folders[0], metas[0]), metas[0]["seq_len"])
    for f, m in zip(folders[1:], metas[1:]):
        other = (tokenizer_identity(f, m), m["seq_len"])
        for what, a, b in zip(("tokenizer (vocabulary and merges)", "block length (seq_len)"), first, other):
            if a != b:
                raise DatasetError(
                    f"data.dataset mixes {folders[0]} and {f}, whose {what} differs ({a} vs {b}); "
                    "prepare them with the same tokenizer folder and --seq-len"
                )
    return metas[0]


def open_train(
    folders: list[Path],
    weights: list[float],
    schedule: list[list[int]] | None,
    global_batch: int,
    seed: int,
) -> tuple[Catalog, BlockOrder]:
    """The train split of every (dataset, block length) the run serves, and the global order over them."""
    native = read_metadata(folders[0])["seq_len"]
    schedule = schedule or [[0, native]]
    lengths = list(dict.fromkeys(L for _, L in schedule))
    views = {(k, L): PackedDataset(f, "train", L) for k, f in enumerate(folders) for L in lengths}
    mix = MixtureSlots(weights, seed) if len(folders) > 1 else None
    sizes = {key: len(v) for key, v in views.items()}
    order = BlockOrder(sizes, schedule, global_batch, seed, native, mix)
    return Catalog(list(views.values())), order


def open_valid(folders: list[Path]) -> PackedDataset | RoundRobin:
    views = [PackedDataset(f, "valid") for f in folders]
    return views[0] if len(views) == 1 else RoundRobin(views)

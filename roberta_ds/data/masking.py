"""Dynamic masking (RoBERTa, Liu et al. 2019 section 4.1; fairseq's MaskTokensDataset).

Each time a block is served, a fresh mask is drawn from a generator seeded by (seed, position in the
global sample sequence), so it differs across epochs yet is reproducible on resume whatever the
number of workers or ranks. Of the non-special tokens, 15% are chosen (the count is
floor(0.15 * n + u), u ~ U[0, 1), as fairseq does); of those 80% become <mask>, 10% a random
non-special token, 10% stay. Labels are IGNORE_INDEX elsewhere.

The batch also carries `mlm_positions` (B, K): each row's chosen positions, padded with unchosen ones
(label IGNORE_INDEX) to K = max_masked(S), which bounds the count above whatever the draw. The model
gathers exactly those B*K rows for its head, so the step needs no `nonzero` (no host-device sync) and
the head's shapes are fixed for a given (B, S).

`MaskedBlocks` is the dataset a standard DataLoader reads: item (position, index) is block `index`
masked for global position `position` (what GlobalOrderSampler yields), and `collate` stacks the
items into a batch. `MLMCollator` does both in one call for code that picks its own items.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label of every token without a loss (torch's cross-entropy default)


def max_masked(seq_len: int, mlm_probability: float) -> int:
    """An upper bound of the tokens chosen in a row of seq_len: floor(p * n + u) <= floor(p * S) + 1."""
    return min(seq_len, int(mlm_probability * seq_len) + 1)


def masked_positions(labels_BS: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64: each row's labelled positions in order, then unlabelled ones (k >= the count)."""
    unlabelled_BS = (labels_BS == IGNORE_INDEX).to(torch.int8)
    return torch.argsort(unlabelled_BS, dim=1, stable=True)[:, :k]


class MaskedBlocks(torch.utils.data.Dataset):
    """A dataset of packed blocks as the DataLoader serves it: masked, keyed by (position, index)."""

    def __init__(
        self,
        dataset,
        vocab_size: int,
        mask_id: int,
        special_ids: list[int],
        seed: int,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        document_mask: bool = False,
    ):
        self.dataset, self.seed = dataset, seed
        self.mask_id, self.p = mask_id, mlm_probability
        self.p_mask, self.p_random = mask_replace_prob, random_replace_prob
        self.document_mask = document_mask
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[torch.tensor(special_ids + [mask_id])] = True
        self.special = special
        self.random_pool = (~special).nonzero(as_tuple=True)[0]  # random replacements are never special

    def mask(self, ids_S: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + position) % (2**63))
        cand = (~self.special[ids_S]).nonzero(as_tuple=True)[0]
        n = int(self.p * len(cand) + torch.rand((), generator=g).item())
        chosen = cand[torch.randperm(len(cand), generator=g)[:n]]
        labels = torch.full_like(ids_S, IGNORE_INDEX)
        labels[chosen] = ids_S[chosen]
        out = ids_S.clone()
        u = torch.rand(n, generator=g)
        to_mask = chosen[u < self.p_mask]
        to_rand = chosen[(u >= self.p_mask) & (u < self.p_mask + self.p_random)]
        out[to_mask] = self.mask_id
        out[to_rand] = self.random_pool[torch.randint(len(self.random_pool), (len(to_rand),), generator=g)]
        return out, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        """item: (global position, block index), as GlobalOrderSampler yields them."""
        position, index = item
        block = self.dataset[index]
        input_ids, labels = self.mask(block["input_ids"], position)
        return {"input_ids": input_ids, "labels": labels, "segment_ids": block["segment_ids"]}

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Items -> a batch of (B, S) tensors with the padding mask and `mlm_positions` (B, K)."""
        input_ids = torch.stack([s["input_ids"] for s in samples])
        labels_BS = torch.stack([s["labels"] for s in samples])
        batch = {
            "input_ids": input_ids,
            "labels": labels_BS,
            "attention_mask": (input_ids != self.dataset.pad).long(),
            "mlm_positions": masked_positions(labels_BS, max_masked(input_ids.shape[1], self.p)),
        }
        if self.document_mask:
            batch["segment_ids"] = torch.stack([s["segment_ids"] for s in samples])
        return batch


class MLMCollator(MaskedBlocks):
    """Masks and collates in one call, for code that picks its own items (validation, benchmarks)."""

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """items: (global position, block index) pairs."""
        return self.collate([self[item] for item in items])

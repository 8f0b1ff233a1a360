"""Dynamic masking (RoBERTa, Liu et al. 2019 section 4.1; fairseq's MaskTokensDataset).

Each time a block is served, a fresh mask is drawn from a generator seeded by (seed, position in the
global sample sequence), so it differs across epochs yet is reproducible on resume whatever the
number of workers or ranks. Of the non-special tokens, 15% are chosen (the count is
floor(0.15 * n + u), u ~ U[0, 1), as fairseq does); of those 80% become <mask>, 10% a random
non-special token, 10% stay. Labels are -100 elsewhere.
"""

from __future__ import annotations

import torch

from roberta_ds.model.roberta import IGNORE_INDEX


class MLMCollator:
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

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """items: (global position, block index) pairs from GlobalOrderSampler."""
        ids, labels, segs = [], [], []
        for position, index in items:
            block = self.dataset[index]
            x, y = self.mask(block["input_ids"], position)
            ids.append(x)
            labels.append(y)
            segs.append(block["segment_ids"])
        input_ids = torch.stack(ids)
        batch = {
            "input_ids": input_ids,
            "labels": torch.stack(labels),
            "attention_mask": (input_ids != self.dataset.pad).long(),
        }
        if self.document_mask:
            batch["segment_ids"] = torch.stack(segs)
        return batch

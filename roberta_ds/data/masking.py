"""Dynamic masking (RoBERTa, Liu et al. 2019 section 4.1; fairseq's MaskTokensDataset).

Each time a block is served, a fresh mask is drawn from a generator seeded by (seed, position in the
global sample sequence), so it differs across epochs yet is reproducible on resume whatever the
number of workers or ranks. Of the n non-special tokens, a budget of floor(p * n + u) tokens,
u ~ U[0, 1), is chosen (fairseq's probabilistic rounding); of those 80% become <mask>, 10% a random
non-special token, 10% stay (decided per token in every variant, as BERT's whole-word masking does).
Labels are IGNORE_INDEX elsewhere. What is chosen (`data.masking`):

- token (RoBERTa's default): `budget` tokens uniformly at random.
- whole_word: words in a random order, each taken whole when it fits in what is left of the budget
  (never split, so the count never passes the budget). A word starts at a token whose text begins
  with whitespace (byte-level BPE's 'Ġ', also newline/tab) or after a special token (so a block's
  first token starts one); fairseq's mask_whole_words uses the same rule for GPT-2's BPE.
- span: SpanBERT's spans (Joshi et al. 2020, section 3.1) counted in tokens, as fairseq's
  mask_multiple_length: lengths l ~ Geometric(span_length_p) truncated to [1, span_max] and
  renormalised (SpanBERT's code; mean 3.8 for p = 0.2, max 10), each span placed uniformly where it
  fits among free non-special tokens (spans never cross a special token or overlap), until the budget;
  the last span is cut to the budget.

The rate p may follow `data.mlm_probability_schedule` (Mosaic: 30% falling to 15%): linear between
[step, rate] points, a pure function of the optimizer step consuming the sample (position // global
batch), so resume stays exact. Validation masks at the fixed data.mlm_probability.

The batch also carries `mlm_positions` (B, K): each row's chosen positions, padded with unchosen ones
(label IGNORE_INDEX) to K = max_masked(S, highest rate); no variant chooses more than the budget,
so K bounds the count whatever the draw. The model gathers exactly those B*K rows for its head, so
the step needs no `nonzero` (no host-device sync) and the head's shapes are fixed for a given (B, S).

`MaskedBlocks` is the dataset a standard DataLoader reads: item (position, index) is block `index`
masked for global position `position` (what GlobalOrderSampler yields), and `collate` stacks the
items into a batch. `MLMCollator` does both in one call for code that picks its own items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from roberta_ds.config import DataConfig, Schedule
from roberta_ds.data.dataset import DatasetError, read_metadata

IGNORE_INDEX = -100  # the label of every token without a loss (torch's cross-entropy default)
# GPT-2's byte-to-unicode map sends the whitespace bytes \t \n \v \f \r and space to chr(256 + byte)
# ('Ġ' is the space): a token starting with one of them starts a word.
WHITESPACE_LEAD = frozenset(chr(256 + b) for b in b"\t\n\x0b\x0c\r ")


def max_masked(seq_len: int, mlm_probability: float) -> int:
    """An upper bound of the tokens chosen in a row of seq_len: floor(p * n + u) <= floor(p * S) + 1."""
    return min(seq_len, int(mlm_probability * seq_len) + 1)


def masked_positions(labels_BS: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) int64: each row's labelled positions in order, then unlabelled ones (k >= the count)."""
    unlabelled_BS = (labels_BS == IGNORE_INDEX).to(torch.int8)
    return torch.argsort(unlabelled_BS, dim=1, stable=True)[:, :k]


def mlm_probability_at(schedule: list[list[float]] | None, step: int, default: float) -> float:
    """The masking rate of optimizer step `step` under [[first_step, rate], ...] (step 0 first):
    linear between points, the last rate after the last point."""
    return Schedule(schedule, "linear").value_at(step) if schedule else default


def word_start_table(tokenizer_dir: str | Path, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: which tokens of a byte-level BPE begin with whitespace (start a word)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DatasetError(f"{path} not found: data.masking: whole_word reads the dataset's tokenizer")
    vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    if "Ġ" not in vocab:
        raise DatasetError(
            f"{path} is not a byte-level BPE (no 'Ġ' token): data.masking: whole_word finds words by "
            "the byte-level space; use token or span masking with this tokenizer"
        )
    table = torch.zeros(vocab_size, dtype=torch.bool)
    starts = [i for t, i in vocab.items() if t[:1] in WHITESPACE_LEAD and i < vocab_size]
    table[torch.tensor(starts, dtype=torch.long)] = True
    return table


def span_length_probs(p: float, max_len: int) -> torch.Tensor:
    """(max_len,) P(length = 1 + i): Geometric(p) truncated to [1, max_len] and renormalised."""
    probs = p * (1 - p) ** torch.arange(max_len, dtype=torch.float64)
    return probs / probs.sum()


def fill_in_order(lengths: list[int], budget: int) -> list[int]:
    """Indices of the items taken in order, each when it fits in what is left of the budget."""
    taken, left = [], budget
    for i, n in enumerate(lengths):
        if left == 0:
            break
        if n <= left:
            taken.append(i)
            left -= n
    return taken


def draw_spans(
    free_S: np.ndarray, budget: int, probs_L: torch.Tensor, g: torch.Generator
) -> list[tuple[int, int]]:
    """Disjoint (start, length) spans over the True positions of free_S (modified in place), lengths
    ~ probs_L (1-based), each placed uniformly among the starts where it fits, the last cut so the
    lengths sum to the budget (or to the free tokens, if fewer). A length no free run can hold (rare:
    many tiny documents) is cut to the longest run."""
    if budget == 0:
        return []
    lengths = (torch.multinomial(probs_L, budget, replacement=True, generator=g) + 1).tolist()
    u = torch.rand(budget, generator=g).tolist()
    S, spans, left = len(free_S), [], budget
    ar = np.arange(S)
    for length, uk in zip(lengths, u):
        # run_S[i]: free positions from i on before the next taken or special one
        run_S = np.minimum.accumulate(np.where(free_S, S, ar)[::-1])[::-1] - ar
        longest = int(run_S.max())
        if longest == 0:
            break
        starts = np.flatnonzero(run_S >= min(length, longest))
        s, n = int(starts[int(uk * len(starts))]), min(length, longest, left)
        free_S[s : s + n] = False
        spans.append((s, n))
        left -= n
        if left == 0:
            break
    return spans


class MaskedBlocks(torch.utils.data.Dataset):
    """A dataset of packed blocks as the DataLoader serves it: masked, keyed by (position, index).

    masking: 'token' | 'whole_word' (needs word_start, see word_start_table) | 'span' (span_length_p,
    span_max); schedule: [[first_step, rate], ...] replacing mlm_probability, with global_batch to
    turn a position into its step.
    """

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
        *,
        masking: str = "token",
        word_start: torch.Tensor | None = None,
        span_length_p: float = 0.2,
        span_max: int = 10,
        schedule: list[list[float]] | None = None,
        global_batch: int | None = None,
    ):
        if masking == "whole_word" and word_start is None:
            raise ValueError("masking='whole_word' needs the tokenizer's word_start table")
        if schedule and not global_batch:
            raise ValueError("a masking-rate schedule needs global_batch (position // global_batch = step)")
        self.dataset, self.seed = dataset, seed
        self.mask_id, self.p = mask_id, mlm_probability
        self.p_mask, self.p_random = mask_replace_prob, random_replace_prob
        self.document_mask = document_mask
        self.masking, self.word_start = masking, word_start
        self.span_probs = span_length_probs(span_length_p, span_max)
        self.schedule, self.global_batch = schedule or None, global_batch
        self.p_max = max(p for _, p in schedule) if schedule else mlm_probability  # sizes K
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[torch.tensor(special_ids + [mask_id])] = True
        self.special = special
        self.random_pool = (~special).nonzero(as_tuple=True)[0]  # random replacements are never special

    @classmethod
    def from_config(
        cls, dataset, folder: Path, data: DataConfig, seed: int, global_batch: int | None = None
    ) -> MaskedBlocks:
        """The run's masking over `dataset`, with the prepared `folder`'s specials and tokenizer
        (a mixture's datasets share one). global_batch: the training schedule's; None (validation)
        masks at the fixed data.mlm_probability."""
        meta = read_metadata(folder)
        sp, vocab = meta["special_tokens"], meta["vocab_size"]
        whole_word = data.masking == "whole_word"
        return cls(
            dataset,
            vocab,
            sp["mask"],
            [sp["bos"], sp["pad"], sp["eos"], sp["unk"]],
            seed,
            data.mlm_probability,
            data.mask_replace_prob,
            data.random_replace_prob,
            data.document_mask,
            masking=data.masking,
            word_start=word_start_table(Path(folder) / "tokenizer", vocab) if whole_word else None,
            span_length_p=data.span_length_p,
            span_max=data.span_max,
            schedule=data.mlm_probability_schedule if global_batch else None,
            global_batch=global_batch,
        )

    def rate_at(self, position: int) -> float:
        """The masking rate of the sample at global `position` (that of the step consuming it)."""
        return mlm_probability_at(self.schedule, position // (self.global_batch or 1), self.p)

    def mask(self, ids_S: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + position) % (2**63))
        cand = (~self.special[ids_S]).nonzero(as_tuple=True)[0]
        budget = int(self.rate_at(position) * len(cand) + torch.rand((), generator=g).item())
        chosen = self.choose(ids_S, cand, budget, g)
        labels = torch.full_like(ids_S, IGNORE_INDEX)
        labels[chosen] = ids_S[chosen]
        out = ids_S.clone()
        u = torch.rand(len(chosen), generator=g)
        to_mask = chosen[u < self.p_mask]
        to_rand = chosen[(u >= self.p_mask) & (u < self.p_mask + self.p_random)]
        out[to_mask] = self.mask_id
        out[to_rand] = self.random_pool[torch.randint(len(self.random_pool), (len(to_rand),), generator=g)]
        return out, labels

    def choose(
        self, ids_S: torch.Tensor, cand: torch.Tensor, budget: int, g: torch.Generator
    ) -> torch.Tensor:
        """(<= budget,) int64: positions among the candidates `cand` (sorted), by self.masking."""
        if self.masking == "token":
            return cand[torch.randperm(len(cand), generator=g)[:budget]]
        if self.masking == "whole_word":
            # a word starts at a whitespace-led token or after a special (a gap in cand)
            after_gap = torch.ones_like(cand, dtype=torch.bool)
            after_gap[1:] = cand[1:] != cand[:-1] + 1
            word_C = torch.cumsum(self.word_start[ids_S[cand]] | after_gap, 0) - 1
            lens_W = torch.bincount(word_C)
            perm = torch.randperm(len(lens_W), generator=g)
            take_W = torch.zeros(len(lens_W), dtype=torch.bool)
            take_W[perm[fill_in_order(lens_W[perm].tolist(), budget)]] = True
            return cand[take_W[word_C]]
        free_S = np.zeros(len(ids_S), dtype=bool)
        free_S[cand.numpy()] = True
        spans = draw_spans(free_S, budget, self.span_probs, g)
        return torch.tensor([s + i for s, n in spans for i in range(n)], dtype=torch.long)

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
            "mlm_positions": masked_positions(labels_BS, max_masked(input_ids.shape[1], self.p_max)),
        }
        if self.document_mask:
            batch["segment_ids"] = torch.stack([s["segment_ids"] for s in samples])
        return batch


class MLMCollator(MaskedBlocks):
    """Masks and collates in one call, for code that picks its own items (validation, benchmarks)."""

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """items: (global position, block index) pairs."""
        return self.collate([self[item] for item in items])

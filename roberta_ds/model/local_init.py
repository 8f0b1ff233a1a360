"""Locality-biased initial weights for attention (`model.attention_init: local`).

Why: with RoBERTa's initialisation (every weight N(0, initializer_range), learned absolute
positions) attention starts uniform over the block, and an MLM can only use a masked token's
neighbours once attention has learnt where they are. Until then the model predicts from the bag of
the block's words: a small model sits on that plateau for thousands of steps (the tiny preset on
the built-in corpus: every head still uniform after 1,200 steps, held-out accuracy 15.6%, most of
it from copying unmasked labels and guessing from the block's topic). Causal LMs do not stall here,
because the next token is predicted from the current one without attention.

What: the same architecture and parameter set (a Hugging Face RobertaForMaskedLM still loads the
weights), with three changes to the initial values only:
- the last `n = min(head_dim, hidden / 4)` hidden dims are reserved for position at init: word and
  token-type embeddings start at zero there, and the position table holds sin/cos of n/2
  frequencies in [0.02 pi, 0.4 pi] there (zero elsewhere), so p_i . p_j peaks at i = j and falls
  off over a few positions (a sum of cosines), at the same per-dim scale as the word part;
- in every head of every layer, the first n rows of W_q and W_k read those dims as a * identity,
  so the score q_i . k_j / sqrt(head_dim) starts as a smooth bump around j = i with height
  SELF_SCORE: at init about half of each head's weight is on itself and a tenth on each neighbour;
- everything else is transformers' N(0, initializer_range).
Training is free to move all of it: on the tiny preset the layer-0 heads become previous-token and
next-token heads (0.8 of their weight) within 1,200 steps, and held-out accuracy reaches ~35%
(README: Quickstart). Related: mimetic initialisation (Trockman & Kolter, 2023) starts attention
with W_q W_k^T near the identity for the same reason (attention that follows position similarity).

It is off by default: base/large follow fairseq's recipe, where the plateau is a small share of
a long run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from roberta_ds.config import ModelConfig

SELF_SCORE = 6.0  # attention logit of a position with itself at init (neighbours ~4.8, far ~0)
FREQ_LO, FREQ_HI = 0.02 * math.pi, 0.4 * math.pi  # radians per position: widths of ~2-3 positions


def position_dims(cfg: ModelConfig) -> int:
    """n: the hidden dims reserved for position at init (even, at most one head's width)."""
    return min(cfg.head_dim, cfg.hidden_size // 4) // 2 * 2


def position_table(num_positions: int, n: int) -> torch.Tensor:
    """(num_positions, n) float32: [sin(i w_k), cos(i w_k)] for n/2 frequencies w_k; every row has
    squared norm n/2, and row_i . row_j = sum_k cos((i - j) w_k) depends only on i - j."""
    i_P1 = torch.arange(num_positions, dtype=torch.float64)[:, None]
    w_K = torch.linspace(FREQ_LO, FREQ_HI, n // 2, dtype=torch.float64)
    return torch.cat([torch.sin(i_P1 * w_K), torch.cos(i_P1 * w_K)], 1).float()


def qk_gain(cfg: ModelConfig) -> float:
    """a with a^2 |p_hat|^2 / sqrt(head_dim) = SELF_SCORE. After the embedding LayerNorm every dim has
    the same variance by construction (word + type: 2 std^2 per dim; position: (2 std)^2 / 2), so
    the normalised position part has |p_hat|^2 = n whatever the std."""
    return math.sqrt(SELF_SCORE * math.sqrt(cfg.head_dim) / position_dims(cfg))


@torch.no_grad()
def apply_(module: nn.Module, cfg: ModelConfig) -> None:
    """Overwrite the standard initial values of one module by its `init_role` (set where the
    model builds it: 'word', 'token_type', 'position', 'qkv'); other modules are left alone. Module
    by module, so that ZeRO-3's per-module gathering (training/builders.init_weights) can call it."""
    role = getattr(module, "init_role", None)
    if role is None:
        return
    D, n = cfg.hidden_size, position_dims(cfg)
    W = module.weight
    if role in ("word", "token_type"):
        W[:, D - n :] = 0.0
    elif role == "position":
        first = cfg.pad_token_id + 1  # RoBERTa's position 0 is row padding_idx + 1
        W.zero_()
        table = position_table(W.shape[0] - first, n) * (2.0 * cfg.initializer_range)
        W[first:, D - n :] = table.to(W.dtype)
    elif role == "qkv":  # (3D, D): rows [W_q; W_k; W_v], head h at rows h*hd .. (h+1)*hd
        eye = qk_gain(cfg) * torch.eye(n, dtype=W.dtype, device=W.device)
        for h in range(cfg.num_heads):
            for row in (h * cfg.head_dim, D + h * cfg.head_dim):  # this head's q rows, then k rows
                W[row : row + n] = 0.0
                W[row : row + n, D - n :] = eye
    else:
        raise ValueError(f"unknown init_role {role!r}")

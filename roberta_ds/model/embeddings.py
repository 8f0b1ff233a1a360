"""RoBERTa embeddings: word + learned positions (offset by padding_idx) + one token-type row."""

from __future__ import annotations

import torch
from torch import nn

from roberta_ds.config import ModelConfig


def position_ids_from_input_ids(input_ids_BS: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Positions count real tokens from padding_idx + 1; padding keeps padding_idx (fairseq's
    `make_positions`, transformers' `create_position_ids_from_input_ids`)."""
    real_BS = input_ids_BS.ne(padding_idx).int()
    return (torch.cumsum(real_BS, dim=1) * real_BS).long() + padding_idx


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        # what model/local_init.py overwrites when model.attention_init is 'local'
        for emb, role in ((self.word, "word"), (self.position, "position"), (self.token_type, "token_type")):
            emb.init_role = role
        self.norm_weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm_bias = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, input_ids_BS: torch.Tensor, ops) -> torch.Tensor:  # -> (B, S, D)
        pos_BS = position_ids_from_input_ids(input_ids_BS, self.cfg.pad_token_id)
        # type_vocab_size is 1 in RoBERTa: every token adds row 0.
        x_BSD = self.word(input_ids_BS) + self.token_type.weight[0]
        p = self.cfg.hidden_dropout if self.training else 0.0
        # RoBERTa normalises (word + type + position) and then applies dropout, so the fused op gets
        # no dropout of its own here.
        h_BSD = ops.layer_norm(
            x_BSD, self.norm_weight, self.norm_bias, self.cfg.layer_norm_eps, residual=self.position(pos_BS)
        )
        return nn.functional.dropout(h_BSD, p=p, training=self.training) if p > 0 else h_BSD

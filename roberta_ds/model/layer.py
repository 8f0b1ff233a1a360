"""One post-LN RoBERTa encoder layer: attention block and feed-forward block.

  h = LayerNorm(dropout(attn(x) @ W_o + b_o) + x)
  y = LayerNorm(dropout(gelu(h @ W_1 + b_1) @ W_2 + b_2) + h)
Q, K and V share one (3D, D) projection so one GEMM feeds the attention kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from roberta_ds.config import ModelConfig


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.qkv = nn.Linear(D, 3 * D)  # rows: [W_q; W_k; W_v]
        self.qkv.init_role = "qkv"  # model/local_init.py (model.attention_init: local)
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(D, F_, bias=False)
        self.fc1_bias = nn.Parameter(torch.zeros(F_))  # applied inside the fused bias+GELU kernel
        self.fc2 = nn.Linear(F_, D)
        self.ffn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x_BSD: torch.Tensor,
        key_padding_mask_BS: torch.Tensor | None,
        segment_ids_BS: torch.Tensor | None,
        ops,
    ) -> torch.Tensor:
        B, S, D = x_BSD.shape
        H = self.cfg.num_heads
        p_hidden = self.cfg.hidden_dropout if self.training else 0.0
        p_attn = self.cfg.attention_dropout if self.training else 0.0

        qkv_BS3HK = self.qkv(x_BSD).view(B, S, 3, H, D // H)
        # packed: the Triton backward writes dq, dk, dv straight into one (B, S, 3, H, K) gradient
        a_BSHK = ops.attention(
            qkv_BS3HK, key_padding_mask=key_padding_mask_BS, segment_ids=segment_ids_BS, dropout_p=p_attn
        )
        o_BSD = self.attn_out(a_BSHK.reshape(B, S, D))
        h_BSD = ops.layer_norm(
            o_BSD,
            self.attn_norm.weight,
            self.attn_norm.bias,
            self.cfg.layer_norm_eps,
            residual=x_BSD,
            dropout_p=p_hidden,
        )

        u_BSF = ops.bias_gelu(self.fc1(h_BSD), self.fc1_bias)
        y_BSD = self.fc2(u_BSF)
        return ops.layer_norm(
            y_BSD,
            self.ffn_norm.weight,
            self.ffn_norm.bias,
            self.cfg.layer_norm_eps,
            residual=h_BSD,
            dropout_p=p_hidden,
        )


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus an output bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.cfg = cfg
        self.dense = nn.Linear(D, D, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(D))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, x_ND: torch.Tensor, ops) -> torch.Tensor:  # (N, D) -> (N, D)
        h_ND = ops.bias_gelu(self.dense(x_ND), self.dense_bias)
        return ops.layer_norm(h_ND, self.norm.weight, self.norm.bias, self.cfg.layer_norm_eps)

    def forward(self, x_ND: torch.Tensor, word_embeddings_VD: torch.Tensor, ops) -> torch.Tensor:
        return F.linear(self.transform(x_ND, ops), word_embeddings_VD, self.bias)  # (N, V)

"""RobertaMLM: the RoBERTa encoder with its masked-LM head, weight-exact with transformers'
RobertaForMaskedLM (see model/hf.py for the state-dict mapping).

Legend: B batch, S sequence, D hidden, H heads, V vocabulary, N selected (masked) tokens.

Activation checkpointing (`model.activation_checkpointing`) wraps each encoder layer in
torch.utils.checkpoint(use_reentrant=False): the forward keeps only the layer's input (B, S, D) and
the backward runs the layer again to rebuild what its ops saved. Why torch's and not
deepspeed.checkpointing:
- Dropout masks: the Triton kernels draw one seed per call from torch's CPU generator
  (roberta_kernels/_utils.new_seed) and the reference path draws from the device generator; torch's
  preserve_rng_state restores both (CPU always, CUDA for the inputs' devices) before the recompute,
  so it draws the same seeds and masks, and the original graph's ctx.seed agrees with the recomputed
  saved tensors (tests/model/test_activation_checkpointing.py: loss and every gradient equal).
  DeepSpeed's restores them too, so this does not decide it.
- ZeRO-3: the recompute fires DeepSpeed's module hooks again, which gather the layer's parameters
  inside the backward and re-partition them after it. The non-reentrant recompute saves trainable
  parameters detached, so that re-partition cannot shrink what the backward uses (the known failure,
  deepspeedai/DeepSpeed#8130, needs frozen parameters; we have none), and it runs inside the one
  backward pass instead of a nested one, the mode DeepSpeed's reentrant path needed fixes for
  (#7780; #988 for shared weights). A recompute whose saved tensors differ in shape or dtype
  raises CheckpointError; equal values (the dropout masks) are what the test checks.
- deepspeed.checkpointing is process-global (configure() before use), copies inputs to the
  accelerator, and its extras (partition_activations across model-parallel ranks, CPU checkpoints)
  buy nothing without model parallelism; torch's also runs plain on CPU and without an engine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from roberta_ds.config import ModelConfig
from roberta_ds.data.masking import IGNORE_INDEX
from roberta_ds.model import local_init
from roberta_ds.model.embeddings import Embeddings
from roberta_ds.model.layer import EncoderLayer, MLMHead
from roberta_ds.model.ops import Ops, resolve_ops


class MLMOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed's ZeRO-3 hooks can see the tensors inside it."""

    loss: torch.Tensor | None = None  # () fp32, mean over masked tokens
    logits: torch.Tensor | None = None  # (B, S, V) without labels; None with labels (never materialised)
    num_masked: torch.Tensor | None = None  # () int64, tokens that contributed to the loss
    correct: torch.Tensor | None = None  # () int64, masked tokens predicted right (argmax)


class RobertaMLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.head = MLMHead(cfg)
        self._ops: Ops | None = None
        self._ops_key: tuple | None = None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' RobertaPreTrainedModel._init_weights: N(0, 0.02), zero biases, the padding row zero.
        std = self.cfg.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if self.cfg.attention_init == "local":
            local_init.apply_(module, self.cfg)

    @property
    def ops(self) -> Ops:
        key = (self.cfg.kernels, self.embeddings.word.weight.device)
        if self._ops_key != key:  # resolved once per (backend, device), not per call
            self._ops, self._ops_key = resolve_ops(*key), key
        return self._ops

    def set_kernels(self, backend: str) -> None:
        """Switch between 'torch', 'triton' and 'auto' at run time."""
        self.cfg.kernels = backend

    def encode(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        segment_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, S, D)
        ops = self.ops
        key_padding_mask_BS = attention_mask_BS.bool() if attention_mask_BS is not None else None
        x_BSD = self.embeddings(input_ids_BS, ops)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x_BSD = checkpoint(
                    layer, x_BSD, key_padding_mask_BS, segment_ids_BS, ops, use_reentrant=False
                )
            else:
                x_BSD = layer(x_BSD, key_padding_mask_BS, segment_ids_BS, ops)
        return x_BSD

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S) int64
        attention_mask: torch.Tensor | None = None,  # (B, S), 1 = real token
        labels: torch.Tensor | None = None,  # (B, S) int64, IGNORE_INDEX where no loss
        segment_ids: torch.Tensor | None = None,  # (B, S) document ids inside packed blocks
        mlm_positions: torch.Tensor | None = None,  # (B, K) every labelled position of each row, padded
    ) -> MLMOutput:
        """With labels: the mean loss over labelled tokens, computed on their rows only. Pass
        mlm_positions (MLMCollator does: each row's labelled positions, padded with unlabelled
        ones to a fixed K) for a step without host-device sync; without it the labelled rows are
        found with `nonzero`, which waits for the device once per call."""
        x_BSD = self.encode(input_ids, attention_mask, segment_ids)
        word_VD = self.embeddings.word.weight
        if labels is None:
            return MLMOutput(logits=self.head(x_BSD, word_VD, self.ops))
        # Masked-only head: gather the ~15% labelled rows first, so the (tokens, V) projection and
        # the loss run on N = 0.15 * B * S rows instead of all of them; the Triton path also fuses the
        # projection with the loss, so no (N, V) logits are returned. Padding rows carry IGNORE_INDEX.
        B, S, D = x_BSD.shape
        labels_flat = labels.reshape(-1)
        if mlm_positions is not None:
            offsets_B1 = torch.arange(0, B * S, S, device=labels.device).unsqueeze(1)
            sel_N = (mlm_positions + offsets_B1).reshape(-1)
        else:
            sel_N = (labels_flat != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        x_ND = x_BSD.reshape(-1, D).index_select(0, sel_N)
        labels_N = labels_flat.index_select(0, sel_N)
        h_ND = self.head.transform(x_ND, self.ops)
        loss, correct = self.ops.linear_cross_entropy(h_ND, word_VD, self.head.bias, labels_N, IGNORE_INDEX)
        return MLMOutput(loss=loss, num_masked=(labels_N != IGNORE_INDEX).sum(), correct=correct)

    def num_parameters(self) -> int:
        """Parameters counted once (the decoder shares the word embeddings)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, mlm_fraction: float = 0.15) -> float:
        return flops_per_token(self.cfg, seq_len, mlm_fraction)


def flops_per_token(cfg: ModelConfig, seq_len: int, mlm_fraction: float = 0.15) -> float:
    """Training FLOPs per input token (forward + backward = 3x forward, matmuls only).

    Per layer: QKV 6D^2, attention output 2D^2, FFN 4DF (x2 for multiply-add), scores and
    weighted sum 4SD; the head: dense 2D^2 + decoder 2DV on the masked fraction only.
    """
    D, F_, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    per_layer = 2 * (4 * D * D + 2 * D * F_) + 4 * seq_len * D
    head = mlm_fraction * (2 * D * D + 2 * D * V)
    return 3.0 * (L * per_layer + head)

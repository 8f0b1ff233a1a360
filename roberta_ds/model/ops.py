"""The narrow interface between the model and roberta_kernels/: four hot ops, one backend switch.

`resolve_ops('auto'|'torch'|'triton', device)` returns the functions the model calls. 'auto' picks
Triton on CUDA and the PyTorch references elsewhere; asking for Triton where it cannot run is an
error, never a silent fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import roberta_kernels


@dataclass(frozen=True)
class Ops:
    backend: str
    # (qkv (B, S, 3, H, D), key_padding_mask, softmax_scale, segment_ids, dropout_p) -> (B, S, H, D)
    attention: Callable
    layer_norm: Callable  # (x, weight, bias, eps, residual, dropout_p) -> LayerNorm(dropout(x) + residual)
    bias_gelu: Callable  # (x, bias) -> gelu(x + bias)
    # (h, decoder weight, decoder bias, labels) -> (mean loss over labelled rows, rows predicted right);
    # the Triton version never holds the (tokens, vocab) logits at once
    linear_cross_entropy: Callable


def triton_usable(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    if device.type == "meta" and roberta_kernels.tracing():  # kernel_tools.perf_report: compiled, not run
        return True, ""
    return False, (
        f"kernels='triton' needs a CUDA device (the model is on {device}); set TRITON_INTERPRET=1 "
        "before importing to run the kernels in Triton's CPU interpreter (slow, for tests), "
        "or use kernels='torch'/'auto'"
    )


def resolve_ops(backend: str, device: torch.device) -> Ops:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return Ops(
            "torch",
            attention=roberta_kernels.attention_qkvpacked_ref,
            layer_norm=_layer_norm_ref_training,
            bias_gelu=roberta_kernels.bias_gelu_ref,
            linear_cross_entropy=roberta_kernels.linear_cross_entropy_ref,
        )
    if backend == "triton":
        ok, why = triton_usable(device)
        if not ok:
            raise RuntimeError(why)
        return Ops(
            "triton",
            attention=roberta_kernels.attention_qkvpacked,
            layer_norm=roberta_kernels.layer_norm,
            bias_gelu=roberta_kernels.bias_gelu,
            linear_cross_entropy=roberta_kernels.linear_cross_entropy,
        )
    raise ValueError(f"unknown kernels backend {backend!r}; choose 'auto', 'torch' or 'triton'")


def _layer_norm_ref_training(x, weight, bias, eps=1e-5, residual=None, dropout_p=0.0):
    # The model passes dropout_p=0 in eval mode, so the reference always applies what it is given.
    return roberta_kernels.layer_norm_ref(x, weight, bias, eps, residual, dropout_p, training=True)

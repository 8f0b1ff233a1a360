"""roberta-ds fused Triton kernels, each with a pure-PyTorch reference (`*_ref`) beside it:

- attention(q, k, v, key_padding_mask=None, softmax_scale=None, segment_ids=None, dropout_p=0.0), and
  attention_qkvpacked(qkv, ...) on a packed (B, S, 3, H, D) projection (its gradient comes back packed)
- layer_norm(x, weight, bias, eps=1e-5, residual=None, dropout_p=0.0): LayerNorm(dropout(x) + residual)
- bias_gelu(x, bias): gelu(x + bias), exact erf GELU
- cross_entropy(logits, labels, ignore_index=-100): mean over non-ignored rows, 0 if none
- linear_cross_entropy(h, weight, bias, labels): the decoder projection fused with cross_entropy, in
  row chunks, so the (tokens, vocab) logits never exist at once; returns (loss, rows predicted right)

Kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1 (set before importing this package).
"""

from roberta_kernels._utils import tracing
from roberta_kernels.attention import attention, attention_qkvpacked, attention_qkvpacked_ref, attention_ref
from roberta_kernels.bias_gelu import bias_gelu, bias_gelu_ref
from roberta_kernels.cross_entropy import cross_entropy, cross_entropy_ref
from roberta_kernels.layer_norm import layer_norm, layer_norm_ref
from roberta_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = [
    "attention",
    "attention_qkvpacked",
    "attention_qkvpacked_ref",
    "attention_ref",
    "bias_gelu",
    "bias_gelu_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "layer_norm",
    "layer_norm_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "tracing",
]

"""roberta-ds fused kernels: attention, residual+dropout+LayerNorm, bias+GELU, cross-entropy.

Each op has a Triton implementation and a pure-PyTorch reference (`*_ref`) beside it.
"""

from kernels.attention import attention_ref
from kernels.bias_gelu import bias_gelu_ref
from kernels.cross_entropy import cross_entropy_ref
from kernels.layer_norm import layer_norm_ref

__all__ = ["attention_ref", "bias_gelu_ref", "cross_entropy_ref", "layer_norm_ref"]

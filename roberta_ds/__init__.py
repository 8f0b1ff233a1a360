"""roberta-ds: RoBERTa pretraining with fused Triton kernels on DeepSpeed."""

from roberta_ds.config import ModelConfig, model_preset
from roberta_ds.model import MLMOutput, RobertaMLM, load_hf, save_hf

__version__ = "0.1.0"
__all__ = ["MLMOutput", "ModelConfig", "RobertaMLM", "load_hf", "model_preset", "save_hf"]

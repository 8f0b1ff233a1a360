"""roberta-ds: RoBERTa pretraining with fused Triton kernels on DeepSpeed."""

from roberta_ds.config import ModelConfig, model_preset

__version__ = "0.1.0"
__all__ = ["MLMOutput", "ModelConfig", "RobertaMLM", "load_hf", "model_preset", "save_hf"]


def __getattr__(name: str):
    # The model (torch, kernels) loads on first use, so that the command-line tools can check
    # their inputs and fail in a fraction of a second.
    if name in ("MLMOutput", "RobertaMLM", "load_hf", "save_hf"):
        from roberta_ds import model

        return getattr(model, name)
    raise AttributeError(f"module 'roberta_ds' has no attribute {name!r}")

"""Conversion to and from transformers' RobertaForMaskedLM: config, state dict, load_hf, save_hf.

Our layout differs in two places: Q, K and V are one (3D, D) projection, and the intermediate and
head dense biases are separate parameters (they are applied inside the fused bias+GELU kernel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from roberta_ds.config import ModelConfig
from roberta_ds.model.roberta import RobertaMLM

_LAYER_RENAMES = {  # ours -> transformers', per layer
    "attn_out.weight": "attention.output.dense.weight",
    "attn_out.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight",
    "attn_norm.bias": "attention.output.LayerNorm.bias",
    "fc1.weight": "intermediate.dense.weight",
    "fc1_bias": "intermediate.dense.bias",
    "fc2.weight": "output.dense.weight",
    "fc2.bias": "output.dense.bias",
    "ffn_norm.weight": "output.LayerNorm.weight",
    "ffn_norm.bias": "output.LayerNorm.bias",
}
_TOP_RENAMES = {
    "embeddings.word.weight": "roberta.embeddings.word_embeddings.weight",
    "embeddings.position.weight": "roberta.embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "roberta.embeddings.token_type_embeddings.weight",
    "embeddings.norm_weight": "roberta.embeddings.LayerNorm.weight",
    "embeddings.norm_bias": "roberta.embeddings.LayerNorm.bias",
    "head.dense.weight": "lm_head.dense.weight",
    "head.dense_bias": "lm_head.dense.bias",
    "head.norm.weight": "lm_head.layer_norm.weight",
    "head.norm.bias": "lm_head.layer_norm.bias",
    "head.bias": "lm_head.bias",
}


def model_config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"only exact GELU is supported, the checkpoint uses hidden_act={hf_config.hidden_act!r}"
        )
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        initializer_range=hf_config.initializer_range,
        pad_token_id=hf_config.pad_token_id,
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        **overrides,
    )


def hf_config_from_model_config(cfg: ModelConfig):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.initializer_range,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        hidden_act="gelu",
        architectures=["RobertaForMaskedLM"],
        tie_word_embeddings=True,
    )


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers' RobertaForMaskedLM state dict -> ours."""
    ours = {ours_k: hf_sd[hf_k] for ours_k, hf_k in _TOP_RENAMES.items()}
    for i in range(num_layers):
        pre = f"roberta.encoder.layer.{i}."
        qkv = ("query", "key", "value")
        ours[f"layers.{i}.qkv.weight"] = torch.cat([hf_sd[f"{pre}attention.self.{n}.weight"] for n in qkv])
        ours[f"layers.{i}.qkv.bias"] = torch.cat([hf_sd[f"{pre}attention.self.{n}.bias"] for n in qkv])
        for ours_k, hf_k in _LAYER_RENAMES.items():
            ours[f"layers.{i}.{ours_k}"] = hf_sd[pre + hf_k]
    return ours


def state_dict_to_hf(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Ours -> transformers' RobertaForMaskedLM (the decoder weight and bias are tied)."""
    hf = {hf_k: sd[ours_k] for ours_k, hf_k in _TOP_RENAMES.items()}
    for i in range(num_layers):
        pre = f"roberta.encoder.layer.{i}."
        for name, w, b in zip(
            ("query", "key", "value"),
            sd[f"layers.{i}.qkv.weight"].chunk(3),
            sd[f"layers.{i}.qkv.bias"].chunk(3),
        ):
            hf[f"{pre}attention.self.{name}.weight"] = w.clone()
            hf[f"{pre}attention.self.{name}.bias"] = b.clone()
        for ours_k, hf_k in _LAYER_RENAMES.items():
            hf[pre + hf_k] = sd[f"layers.{i}.{ours_k}"]
    hf["lm_head.decoder.weight"] = hf["roberta.embeddings.word_embeddings.weight"]
    hf["lm_head.decoder.bias"] = hf["lm_head.bias"]
    return hf


def load_hf(path_or_model: str | Path | Any, **config_overrides: Any) -> RobertaMLM:
    """Our model holding the weights of a transformers RobertaForMaskedLM (a folder or a model)."""
    from transformers import RobertaForMaskedLM

    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        hf = RobertaForMaskedLM.from_pretrained(path, dtype=torch.float32)
    else:
        hf = path_or_model
    cfg = model_config_from_hf(hf.config, **config_overrides)
    model = RobertaMLM(cfg)
    sd = state_dict_from_hf({k: v.detach() for k, v in hf.state_dict().items()}, cfg.num_layers)
    model.load_state_dict(sd, strict=True)
    return model.to(next(hf.parameters()).dtype)


def save_hf(model: RobertaMLM, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write a folder that transformers.AutoModelForMaskedLM.from_pretrained(out_dir) loads."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_hf_state_dict(sd, model.cfg, out_dir, tokenizer)


def save_hf_state_dict(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, tokenizer: Any = None
):
    """save_hf for a bare state dict (e.g. consolidated from ZeRO-3 shards)."""
    from transformers import RobertaForMaskedLM

    out_dir = Path(out_dir)
    hf = RobertaForMaskedLM(hf_config_from_model_config(cfg))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(sd, cfg.num_layers), strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise RuntimeError(
            f"state dict does not map onto RobertaForMaskedLM: missing {missing}, unexpected {unexpected}"
        )
    hf.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir

"""model.attention_init: local (model/local_init.py): attention starts local, the weights stay a
RobertaForMaskedLM, and module-by-module initialisation (the ZeRO-3 path) gives the same structure."""

import math

import pytest
import torch

from roberta_ds.config import ConfigError, load_run_config, model_preset
from roberta_ds.model import RobertaMLM, load_hf, save_hf
from roberta_ds.model.local_init import SELF_SCORE, position_dims

V = 512


def _model(attention_init: str, **kw) -> RobertaMLM:
    cfg = model_preset("tiny", vocab_size=V, kernels="torch", attention_init=attention_init, **kw)
    return RobertaMLM(cfg).eval()


def _attention_by_offset(model: RobertaMLM, layer: int = 0, seq_len: int = 64) -> torch.Tensor:
    """(H, 5) mean attention weight at offsets -2..2 on random tokens, computed from the weights
    with plain softmax(q k^T / sqrt(d)), independently of the model's attention op."""
    ids_BS = torch.randint(5, V, (8, seq_len))
    with torch.no_grad():
        x_BSD = model.embeddings(ids_BS, model.ops)
        for lyr in model.layers[:layer]:
            x_BSD = lyr(x_BSD, None, None, model.ops)
        cfg = model.cfg
        qkv = model.layers[layer].qkv(x_BSD).view(8, seq_len, 3, cfg.num_heads, cfg.head_dim)
        q_BHSK, k_BHSK = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        p_HSS = torch.softmax(q_BHSK @ k_BHSK.transpose(-1, -2) / math.sqrt(cfg.head_dim), -1).mean(0)
    return torch.stack([torch.stack([p.diagonal(d).mean() for d in range(-2, 3)]) for p in p_HSS])


@pytest.mark.parametrize("std", [0.02, 0.06])
def test_local_init_attends_to_neighbours_in_every_head(std):
    by_offset_H5 = _attention_by_offset(_model("local", initializer_range=std))
    uniform = 1 / 64
    # self gets about e^SELF_SCORE against ~1 for far positions: about half the weight
    assert (by_offset_H5[:, 2] > 0.3).all(), by_offset_H5
    # each neighbour well above uniform, and the bump falls off with distance
    assert (by_offset_H5[:, [1, 3]] > 5 * uniform).all(), by_offset_H5
    assert (by_offset_H5[:, [0, 4]] < by_offset_H5[:, [1, 3]]).all(), by_offset_H5


def test_normal_init_attends_uniformly():
    by_offset_H5 = _attention_by_offset(_model("normal"))
    assert torch.allclose(by_offset_H5, torch.full_like(by_offset_H5, 1 / 64), atol=0.01), by_offset_H5


def test_self_score_matches_its_derivation():
    """qk_gain assumes every dim has the same variance after the embedding LayerNorm; the self score
    of a position measured on the model is then SELF_SCORE (up to the word part's sampling noise)."""
    model = _model("local", initializer_range=0.06)
    cfg, n = model.cfg, position_dims(model.cfg)
    ids_BS = torch.randint(5, V, (4, 32))
    with torch.no_grad():
        x_BSD = model.embeddings(ids_BS, model.ops)
        q_BSK = model.layers[0].qkv(x_BSD)[..., :n]  # the position rows of head 0's q
        k_BSK = model.layers[0].qkv(x_BSD)[..., cfg.hidden_size : cfg.hidden_size + n]
    self_score = (q_BSK * k_BSK).sum(-1) / math.sqrt(cfg.head_dim)
    assert self_score.mean().item() == pytest.approx(SELF_SCORE, rel=0.15)


def test_module_by_module_init_gives_the_same_structure():
    """ZeRO-3 initialises module by module under GatheredParameters (training/builders.init_weights);
    the deterministic parts of the local init must come out the same that way."""
    whole = _model("local")
    again = _model("local")
    for module in again.modules():
        again._init_weights(module)
    D, n = whole.cfg.hidden_size, position_dims(whole.cfg)
    assert torch.equal(whole.embeddings.position.weight, again.embeddings.position.weight)
    assert not whole.embeddings.word.weight[:, D - n :].any()
    assert not again.embeddings.word.weight[:, D - n :].any()
    for a, b in zip(whole.layers, again.layers):
        assert torch.equal(a.qkv.weight[:n], b.qkv.weight[:n])
        assert torch.equal(a.qkv.weight[D : D + n], b.qkv.weight[D : D + n])


def test_local_init_round_trips_through_hugging_face(tmp_path):
    """Only initial values change: the model saves to and loads from RobertaForMaskedLM exactly."""
    model = _model("local")
    save_hf(model, tmp_path)
    ids_BS = torch.randint(5, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids_BS).logits, load_hf(tmp_path).eval()(ids_BS).logits)


def test_unknown_attention_init_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  attention_init: locally\n")
    with pytest.raises(ConfigError, match="attention_init"):
        load_run_config(path)

import pytest

import roberta_ds
from roberta_ds.config import TrainConfig
from roberta_ds.training.optim import build_optimizer, lr_lambda, param_groups


def test_no_weight_decay_on_biases_and_layer_norms():
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset("tiny", vocab_size=300))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "embeddings.word.weight" in decayed and "layers.0.qkv.weight" in decayed
    assert all(not (n.endswith("bias") or "norm" in n) for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_adamw_uses_robertas_hyperparameters():
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset("tiny", vocab_size=300))
    opt = build_optimizer(model, TrainConfig(lr=6e-4), offload=False)
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 and g["lr"] == 6e-4


def test_linear_warmup_then_linear_decay():
    f = lr_lambda(TrainConfig(warmup_steps=10, max_steps=110))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))

"""Per-layer activation checkpointing (`model.activation_checkpointing`): the loss and every parameter
gradient are bit-for-bit those of the plain model, dropout included, on the reference path and on the
Triton kernels (interpreter here); the switch is validated like any key; train.py trains with it."""

import copy
import importlib

import pytest
import torch
import yaml

import roberta_ds
from roberta_ds.config import ConfigError, load_run_config
from roberta_kernels._utils import new_seed
from tests.kernels.conftest import DEVICE
from tests.model.test_triton_path import batch


def tiny(kernels: str, **overrides) -> roberta_ds.RobertaMLM:
    # head dim 16 (the smallest the attention kernel takes), dropout on in both places
    cfg = roberta_ds.model_preset(
        "tiny",
        vocab_size=300,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        kernels=kernels,
        **overrides,
    )
    return roberta_ds.RobertaMLM(cfg).to(DEVICE).train()


def loss_and_grads(model, inputs, seed: int):
    torch.manual_seed(seed)  # the dropout seeds (Triton) and masks (reference) of this step
    ids, mask, labels, seg = inputs
    loss = model(ids, mask, labels, segment_ids=seg).loss
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def record_seeds(monkeypatch) -> list[int]:
    """Every dropout seed the Triton kernels draw (roberta_kernels/_utils.new_seed, torch's CPU generator)."""
    seeds = []

    def recording():
        seeds.append(new_seed())
        return seeds[-1]

    for module in ("roberta_kernels.attention", "roberta_kernels.layer_norm"):  # modules, not functions
        monkeypatch.setattr(importlib.import_module(module), "new_seed", recording)
    return seeds


def count_layer_forwards(model) -> list[int]:
    calls = [0]
    for layer in model.layers:
        # a pre-hook: the recompute stops once the last saved tensor is rebuilt (early_stop), so a
        # forward (post-)hook never sees it
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_loss_and_every_gradient_equal_with_dropout(kernels, monkeypatch):
    plain = tiny(kernels)
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.activation_checkpointing = True
    inputs = batch(300, S=28)  # ragged padding and two documents in row 0

    loss, grads = loss_and_grads(plain, inputs, seed=7)
    calls, seeds = count_layer_forwards(ckpt), record_seeds(monkeypatch)
    loss_ck, grads_ck = loss_and_grads(ckpt, inputs, seed=7)
    assert ckpt.ops.backend == kernels
    # each layer ran again in the backward: the checkpointed path was taken
    assert calls[0] == 2 * len(ckpt.layers)
    if kernels == "triton":  # 3 dropout seeds per layer (attention, 2 LayerNorms), drawn again, equal
        L = len(ckpt.layers)
        forward, recomputed = seeds[: 3 * L], seeds[3 * L :]
        assert len(recomputed) == 3 * L and sorted(recomputed) == sorted(forward), seeds
    assert torch.equal(loss_ck, loss), (loss_ck, loss)
    assert grads.keys() == grads_ck.keys() == dict(plain.named_parameters()).keys()
    for name, g in grads.items():
        assert torch.equal(grads_ck[name], g), f"{name}: max diff {(grads_ck[name] - g).abs().max():.3e}"

    # dropout is live, so equality above means the recompute drew the same masks
    other, _ = loss_and_grads(plain, inputs, seed=8)
    assert not torch.equal(other, loss)


def test_recompute_with_other_dropout_masks_is_detected(monkeypatch):
    """The equality test can fail: without restoring the CPU generator the recomputed forward draws
    other Triton dropout seeds than the original graph's ctx.seed, and the gradients change."""
    import roberta_ds.model.roberta as roberta

    real = roberta.checkpoint
    monkeypatch.setattr(roberta, "checkpoint", lambda *a, **k: real(*a, **k, preserve_rng_state=False))
    plain = tiny("triton", num_layers=1)
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.activation_checkpointing = True
    inputs = batch(300, S=28)
    _, grads = loss_and_grads(plain, inputs, seed=7)
    _, grads_ck = loss_and_grads(ckpt, inputs, seed=7)
    assert not torch.equal(grads_ck["layers.0.qkv.weight"], grads["layers.0.qkv.weight"])


def test_no_recompute_in_eval_or_without_grad():
    model = tiny("torch")
    model.cfg.activation_checkpointing = True
    calls = count_layer_forwards(model)
    ids, mask, labels, seg = batch(300, S=28)
    with torch.no_grad():
        model(ids, mask, labels)
    model.eval()
    model(ids, mask, labels).loss.backward()
    assert calls[0] == 2 * len(model.layers)  # once per forward, never again


def test_config_key_is_validated(tmp_path):
    path = tmp_path / "run.yaml"
    assert load_run_config(None).model.activation_checkpointing is False
    path.write_text("model:\n  preset: large\n  activation_checkpointing: true\n")
    assert load_run_config(path).model.activation_checkpointing is True
    path.write_text("model:\n  activation_checkpointing: sometimes\n")
    with pytest.raises(
        ConfigError, match=rf"{path}: model\.activation_checkpointing: expected true or false"
    ):
        load_run_config(path)
    path.write_text("train:\n  activation_checkpointing: true\n")
    with pytest.raises(ConfigError, match=rf"{path}: train: unknown key 'activation_checkpointing'"):
        load_run_config(path)


def test_switching_it_does_not_make_another_run(tmp_path):
    """How a run runs, not what it trains: a run folder from before the key, or with it on, resumes."""
    from roberta_ds.training.run_dir import check_run_dir

    cfg = load_run_config(None, {"train": {"run_dir": str(tmp_path)}})
    cfg.model.activation_checkpointing = True
    saved = cfg.to_dict()
    del saved["model"]["activation_checkpointing"]
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(cfg, tmp_path)  # no error


def test_train_py_with_checkpointing_takes_the_same_steps(kjv_dataset, tmp_path):
    """A few real steps of train.py (one process, ZeRO-3: the recompute re-fires its parameter hooks
    inside the backward), dropout on: the per-step losses equal the run without checkpointing."""
    from tests.training.conftest import launch, losses, write_config, write_ds

    ds = write_ds(tmp_path / "ds.json")
    runs = {}
    for on in (False, True):
        run_dir = tmp_path / f"run_{on}"
        cfg = write_config(tmp_path / f"{on}.yaml", kjv_dataset, run_dir, max_steps=4, save_every=0)
        raw = yaml.safe_load(cfg.read_text())
        raw["model"].update(activation_checkpointing=on, hidden_dropout=0.1, attention_dropout=0.1)
        cfg.write_text(yaml.safe_dump(raw))
        res = launch("python", 1, cfg, ds, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[on] = losses(run_dir)
        assert (
            yaml.safe_load((run_dir / "run_config.yaml").read_text())["model"]["activation_checkpointing"]
            is on
        )
    assert sorted(runs[True]) == [1, 2, 3, 4]
    assert runs[True] == runs[False]

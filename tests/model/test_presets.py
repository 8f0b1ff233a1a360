import pytest

import roberta_ds


@pytest.mark.parametrize("name, lo, hi", [("base", 124e6, 126e6), ("large", 354e6, 356e6)])
def test_preset_parameter_counts(name, lo, hi):
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset(name))
    n = model.num_parameters()  # tied decoder counted once
    assert lo <= n <= hi, n


def test_tiny_preset_builds_and_runs():
    import torch

    cfg = roberta_ds.model_preset("tiny")
    model = roberta_ds.RobertaMLM(cfg)
    out = model(torch.randint(4, cfg.vocab_size, (2, 16)))
    assert out.logits.shape == (2, 16, cfg.vocab_size)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        roberta_ds.model_preset("huge")

"""The shipped CPU ZeRO-1 and ZeRO-2 configs train for real: 2 ranks over gloo through train.py, the
loss goes down, and both stages take the same steps (fp32: they differ only in what is partitioned)."""

import json

import pytest

from tests.training.conftest import ROOT, launch, losses, write_config

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def runs(kjv_dataset, tmp_path_factory):
    out = {}
    for stage in (1, 2):
        d = tmp_path_factory.mktemp(f"zero{stage}")
        cfg = write_config(d / "run.yaml", kjv_dataset, d / "run", max_steps=12, save_every=12, keep_last=1)
        res = launch("torchrun", 2, cfg, ROOT / "ds_configs" / f"cpu_zero{stage}.json")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        out[stage] = d / "run"
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_trains_on_two_ranks(runs, stage):
    loss = losses(runs[stage])
    assert sorted(loss) == list(range(1, 13))
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.3, (first, last)  # ln(512) = 6.2 at the start
    assert (runs[stage] / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    resolved = json.loads((runs[stage] / "ds_config.json").read_text())  # what the engine was given
    assert resolved["zero_optimization"]["stage"] == stage
    assert resolved["gradient_accumulation_steps"] == 1  # 16 = 8 per rank x 2 ranks


def test_zero1_and_zero2_take_the_same_steps(runs):
    a, b = losses(runs[1]), losses(runs[2])
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)

"""The README's main job, run as a user runs it (`bash scripts/quickstart.sh`: 2 processes, ZeRO-1,
1800 steps, export, quality gate; about 5 minutes on 2 cores), with the run folder and the built-in
corpus's cache in a temporary folder. It must show learning: the trained model beats its random-init
twin on every probe by a wide margin, the before/after tables are printed, and the loggers hold the
run (TensorBoard, an offline W&B run, metrics.png)."""

import json
import os
import subprocess

import pytest
import yaml

from tests.training.conftest import ROOT
from tests.training.wandb_records import wandb_history

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    d = tmp_path_factory.mktemp("quickstart")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    cfg["data"]["cache_dir"] = str(d / "data_cache")  # nothing lands in the repo
    (d / "tiny_cpu.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RUN_DIR=str(d / "run"), CONFIG=str(d / "tiny_cpu.yaml"), SETUP_APT="0")
    env.pop("TRITON_INTERPRET", None)
    env.pop("WANDB_MODE", None)  # as a user has it: W&B (a test extra) logs offline
    res = subprocess.run(
        ["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return d / "run", res.stdout


def test_quickstart_beats_random_init_on_every_probe(quickstart):
    run, _ = quickstart
    res = json.loads((run / "evaluation.json").read_text())
    before, after = res["random"], res["trained"]
    # measured on one 2-core host (README: Quickstart), bf16 config / fp32 config: held-out accuracy
    # 0.1% -> 39.5% / 39.1%, cloze top-1 0% -> 11.3% / 11.7% (top-5 20.7%), Bible 19.3% / 16.7%,
    # Python docs 3.3% / 6.7%, fine-tune 52.3% -> 77.0% / 81.3%, linear probe 65.0% -> 75.3% / 79.7%
    # (mean-pooled random features already tell the sources apart by their words)
    assert before["heldout_mlm"]["accuracy"] < 0.02 and after["heldout_mlm"]["accuracy"] > 0.30
    assert after["heldout_mlm"]["loss"] < before["heldout_mlm"]["loss"] - 4.0
    assert before["cloze"]["top1"] < 0.01 and after["cloze"]["top1"] > 0.06
    assert after["cloze"]["top5"] > 0.12
    assert after["cloze"]["top1_bible"] > 0.08 and after["cloze"]["top1_python"] > 0.01  # both sources
    # The random-init fine-tune is the noisy side: 52.3% on the AVX-512 hosts above, 65.0% on an
    # AVX2-only one (2026-12-04, trained 77.7% there); so a margin of 0.10 and a floor for the trained.
    assert after["finetune"]["median"] > max(before["finetune"]["median"] + 0.10, 0.70)
    assert after["linear_probe_accuracy"] > before["linear_probe_accuracy"] + 0.05


def test_quickstart_prints_the_tables_and_keeps_the_logs(quickstart):
    run, out = quickstart
    assert "before (random init)" in out and "cloze top-1 / top-5" in out and "source probe" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("|")]
    hits = [r for r in rows if len(r) == 7 and r[-2].strip() == "yes"]  # fill-mask rows: 5 cells
    assert len(hits) >= 2  # several cloze items right in the printed fill-mask table
    assert (run / "hf" / "config.json").is_file() and (run / "metrics.png").stat().st_size > 10_000
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    history = wandb_history(run)
    assert sorted(s for s, h in history.items() if "valid/valid_accuracy" in h) == [600, 1200, 1800]
    assert "train/loss" in history[1800]


def test_the_quickstart_bench_reads_the_run_as_the_command_prints_it(quickstart):
    """`python -m roberta_ds.bench quickstart` (README's figures) reads this run: its tables are the
    ones the command printed, from the subset of the results it keeps."""
    from roberta_ds.benchmarks import quickstart as bench

    run, out = quickstart
    info = {"date": "now", "commit": "abc1234", "torch": "2.x", "load_at_start": 0.0}
    m = bench.summarise(run, out, 456.0, info)
    assert [s for s, _ in m["valid_accuracy"]] == [600, 1200, 1800]
    assert m["ds_config"].startswith("ds_configs/cpu_quickstart") and m["train_seconds"] > 0
    assert m["loss_last"] < m["loss_first"] and m["tokens_per_s_median"] > 0
    md = bench.markdown(m)
    assert "7 min 36 s for the whole command" in md
    tables = md.split("gets wrong:\n\n", 1)[1].strip()
    assert tables in out

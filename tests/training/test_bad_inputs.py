"""Each bad input gives one clear message (exit code 2) before any process group or model exists."""

import json

import pytest

import train
from tests.training.conftest import write_config, write_ds


@pytest.fixture
def good(kjv_dataset, tmp_path):
    return write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run"), write_ds(tmp_path / "ds.json")


def run(capsys, *argv):
    code = train.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_malformed_json_names_file_and_line(good, tmp_path, capsys):
    cfg, _ = good
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 3,}\n}\n')
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", bad)
    assert code == 2 and f"{bad}: line 3" in err and "malformed JSON" in err


def test_malformed_yaml_and_unknown_key(good, tmp_path, capsys):
    _, ds = good
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 10\n")
    code, err = run(capsys, "--config", bad, "--deepspeed_config", ds)
    assert code == 2 and "train: unknown key 'max_step'" in err
    bad.write_text("train: [\n")
    code, err = run(capsys, "--config", bad, "--deepspeed_config", ds)
    assert code == 2 and "malformed YAML" in err and "line 2" in err


def test_inconsistent_batch_sizes(good, tmp_path, capsys):
    cfg, _ = good
    ds = write_ds(tmp_path / "b.json", train_batch_size=10, train_micro_batch_size_per_gpu=4)
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds)
    assert code == 2 and "train_batch_size=10 is not divisible by train_micro_batch_size_per_gpu=4" in err
    ds = write_ds(tmp_path / "c.json", gradient_accumulation_steps=3)
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds)
    assert (
        code == 2
        and "train_batch_size=8 != train_micro_batch_size_per_gpu=4 x gradient_accumulation_steps=3" in err
    )


def test_fp16_on_cpu(good, capsys):
    cfg, _ = good
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", "ds_configs/zero3_fp16.json")
    assert code == 2 and "fp16 is enabled but there is no GPU" in err


def test_optimizer_section_is_refused(good, tmp_path, capsys):
    cfg, _ = good
    ds = write_ds(tmp_path / "o.json", optimizer={"type": "Adam"})
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds)
    assert code == 2 and "remove the 'optimizer' section" in err


def test_vocab_mismatch(kjv_dataset, tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    cfg.write_text(cfg.read_text().replace("vocab_size: 512", "vocab_size: 1000"))
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", write_ds(tmp_path / "ds.json"))
    assert code == 2 and "has 512 tokens but model.vocab_size=1000" in err


def test_seq_len_above_positions(kjv_dataset, tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    cfg.write_text(cfg.read_text().replace("max_position_embeddings: 66", "max_position_embeddings: 40"))
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", write_ds(tmp_path / "ds.json"))
    assert code == 2 and "data.seq_len=64 is above the model's 38 positions" in err


def test_missing_dataset(tmp_path, capsys):
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "nope", tmp_path / "run")
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", write_ds(tmp_path / "ds.json"))
    assert code == 2 and "dataset not found" in err and "nope" in err


def test_missing_and_corrupt_checkpoint(good, tmp_path, capsys):
    cfg, ds = good
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds, "--resume", tmp_path / "none")
    assert code == 2 and "checkpoint to resume from not found" in err
    broken = tmp_path / "old" / "checkpoints" / "step_00000010"
    broken.mkdir(parents=True)
    (broken.parent / "latest").write_text("step_00000010\n")
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds, "--resume", tmp_path / "old")
    assert code == 2 and "incomplete or corrupt checkpoint" in err


def test_new_run_never_overwrites_another_runs_checkpoints(good, tmp_path, capsys):
    cfg, ds = good
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run_config.yaml").write_text(
        json.dumps({"model": {"hidden_size": 1}, "data": {}, "train": {}})
    )
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds)
    assert code == 2 and "holds another run" in err
    cfg.write_text(cfg.read_text().replace("max_steps: 30", "max_steps: 30\n  resume: null"))
    code, err = run(capsys, "--config", cfg, "--deepspeed_config", ds)
    assert code == 2 and "already holds checkpoints" in err


def test_runtime_only_settings_may_change_when_resuming(good):
    """kernels / num_workers / cache_dir describe how a run runs, not what it trains."""
    import yaml

    from roberta_ds.config import load_run_config
    from roberta_ds.training.engine import check_run_dir

    cfg_path, _ = good
    cfg = load_run_config(cfg_path)
    run_dir = cfg_path.parent / "run"
    run_dir.mkdir()
    saved = cfg.to_dict()
    saved["model"]["kernels"], saved["data"]["num_workers"] = "triton", 4
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(cfg, run_dir)  # no error

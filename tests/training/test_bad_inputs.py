"""Every bad input ends in exit code 2 and one message naming the file, key or value, through the
real command lines (train.py, python -m roberta_ds.prepare / .export), before any process group
forms where possible; nothing previously written is lost."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.training.conftest import ROOT, env, write_config, write_ds


class Ctx:
    """Paths for one case: a good run YAML + ds_config, and helpers that make them bad."""

    def __init__(self, tmp: Path, dataset: Path):
        self.tmp, self.dataset = tmp, dataset
        self.cfg = write_config(tmp / "run.yaml", dataset, tmp / "run")
        self.ds = write_ds(tmp / "ds.json")
        self.env: dict = {}

    def yaml(self, section=None, **kv) -> Path:
        raw = yaml.safe_load(self.cfg.read_text())
        if section:
            raw[section].update(kv)
        self.cfg.write_text(yaml.safe_dump(raw))
        return self.cfg

    def text(self, text: str) -> Path:
        self.cfg.write_text(text)
        return self.cfg

    def ds_json(self, text: str | None = None, **kv) -> Path:
        if text is not None:
            self.ds.write_text(text)
        else:
            write_ds(self.ds, **kv)
        return self.ds

    def copy_dataset(self, edit=None, drop: str | None = None) -> Path:
        d = self.tmp / "ds_copy"
        shutil.copytree(self.dataset, d)
        if drop:
            p = d / drop
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if edit:
            meta = json.loads((d / "metadata.json").read_text())
            edit(meta)
            (d / "metadata.json").write_text(json.dumps(meta))
        self.yaml("data", dataset=str(d))
        return d

    def fake_checkpoint(self, model: dict | None = None, files: dict | None = None, **info) -> Path:
        ck = self.tmp / "old" / "checkpoints" / "step_00000010"
        ck.mkdir(parents=True)
        (ck / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        (ck / "COMPLETE").write_text(json.dumps({"step": 10, "model": model, "files": files or {}, **info}))
        (ck.parent / "latest").write_text("step_00000010\n")
        return self.tmp / "old"


def train(c: Ctx, *extra):
    return [str(ROOT / "train.py"), "--config", str(c.cfg), "--deepspeed_config", str(c.ds), *map(str, extra)]


def tiny_model(c: Ctx) -> dict:
    m = yaml.safe_load(c.cfg.read_text())["model"]
    from roberta_ds.config import MODEL_PRESETS, ModelConfig

    return {
        **ModelConfig(**{**MODEL_PRESETS["tiny"], **{k: v for k, v in m.items() if k != "preset"}}).__dict__
    }


def _mark_valid_empty(meta):
    meta["splits"]["valid"]["num_blocks"] = 0


def _with_model(c: Ctx, **change) -> Path:
    return c.fake_checkpoint(model={**tiny_model(c), **change})


# (id, argv builder, text the message must contain). Each builder may edit the case's files.
CASES = [
    # run YAML: values checked by the typed config, before torch is imported
    ("negative_lr", lambda c: train(c.yaml("train", lr=-1.0) and c), "train.lr=-1.0 must be >= 0"),
    ("max_steps_0", lambda c: train(c, "--max_steps", 0), "train.max_steps=0 must be >= 1"),
    ("max_steps_negative", lambda c: train(c.yaml("train", max_steps=-5) and c), "train.max_steps=-5"),
    ("log_every_0", lambda c: train(c.yaml("train", log_every=0) and c), "train.log_every=0"),
    ("eval_batches_0", lambda c: train(c.yaml("train", eval_batches=0) and c), "train.eval_batches=0"),
    ("eval_every_negative", lambda c: train(c.yaml("train", eval_every=-1) and c), "train.eval_every=-1"),
    ("keep_last_negative", lambda c: train(c.yaml("train", keep_last=-1) and c), "train.keep_last=-1"),
    ("warmup_negative", lambda c: train(c.yaml("train", warmup_steps=-2) and c), "train.warmup_steps=-2"),
    ("eps_0", lambda c: train(c.yaml("train", eps=0.0) and c), "train.eps=0.0 must be > 0"),
    ("beta_1", lambda c: train(c.yaml("train", betas=[0.9, 1.0]) and c), "train.betas=[0.9, 1.0]"),
    ("min_lr_ratio_2", lambda c: train(c.yaml("train", min_lr_ratio=2.0) and c), "train.min_lr_ratio=2.0"),
    ("time_limit_0", lambda c: train(c.yaml("train", time_limit_minutes=0) and c), "time_limit_minutes=0"),
    ("bad_signal", lambda c: train(c.yaml("train", preempt_signal="SIGFOO") and c), "'SIGFOO'"),
    ("uncatchable_signal", lambda c: train(c.yaml("train", preempt_signal="SIGKILL") and c), "'SIGKILL'"),
    ("mlm_p_above_1", lambda c: train(c.yaml("data", mlm_probability=1.5) and c), "data.mlm_probability=1.5"),
    ("mlm_p_negative", lambda c: train(c.yaml("data", mlm_probability=-0.1) and c), "mlm_probability=-0.1"),
    (
        "replace_probs_sum",
        lambda c: train(c.yaml("data", mask_replace_prob=0.95, random_replace_prob=0.1) and c),
        "random_replace_prob = 1.05",
    ),
    ("num_workers_negative", lambda c: train(c.yaml("data", num_workers=-1) and c), "data.num_workers=-1"),
    ("seq_len_4", lambda c: train(c.yaml("data", seq_len=4) and c), "data.seq_len=4 is too short"),
    (
        "builtin_vocab_too_small",
        lambda c: train(c.yaml("data", dataset="builtin", vocab_size=100) and c),
        "data.vocab_size=100 is too small",
    ),
    (
        "hidden_dropout_1",
        lambda c: train(c.yaml("model", hidden_dropout=1.0) and c),
        "model.hidden_dropout=1.0",
    ),
    ("heads_not_dividing", lambda c: train(c.yaml("model", num_heads=5) and c), "model.num_heads=5"),
    ("kernels_literal", lambda c: train(c.yaml("model", kernels="cuda") and c), "model.kernels: 'cuda'"),
    ("unknown_key", lambda c: train(c.yaml("train", max_step=3) and c), "train: unknown key 'max_step'"),
    (
        "wrong_type",
        lambda c: train(c.yaml("train", max_steps="ten") and c),
        "train.max_steps: expected an integer",
    ),
    ("unknown_section", lambda c: train(c.text("optim: {}\n") and c), "unknown section 'optim'"),
    ("top_level_list", lambda c: train(c.text("- 1\n") and c), "top level must be a mapping"),
    ("malformed_yaml", lambda c: train(c.text("train: [\n") and c), "malformed YAML"),
    ("missing_config", lambda c: [str(ROOT / "train.py"), "--config", str(c.tmp / "nope.yaml")], "nope.yaml"),
    (
        "empty_section_and_override",
        lambda c: train(c.text("train:\nmodel:\n") and c, "--max_steps", -1),
        "train.max_steps=-1",
    ),
    # DeepSpeed JSON: checked before the process group
    ("missing_ds_config", lambda c: train(c)[:-1] + [str(c.tmp / "no.json")], "config not found: "),
    ("malformed_json", lambda c: train(c.ds_json('{\n  "train_batch_size": 8,,\n}') and c), "line 2"),
    (
        "optimizer_section",
        lambda c: train(c.ds_json(optimizer={"type": "Adam"}) and c),
        "remove the 'optimizer'",
    ),
    ("batch_not_divisible", lambda c: train(c.ds_json(train_batch_size=10) and c), "train_batch_size=10"),
    (
        "micro_batch_0",
        lambda c: train(c.ds_json(train_micro_batch_size_per_gpu=0) and c),
        "must be a positive",
    ),
    (
        "fp16_on_cpu",
        lambda c: train(c.ds_json(fp16={"enabled": True}) and c),
        "fp16 is enabled but there is no GPU",
    ),
    (
        "fp16_and_bf16",
        lambda c: train(c.ds_json(fp16={"enabled": True}, bfloat16={"enabled": True}) and c),
        "fp16 and bf16 are both enabled",
    ),
    # dataset: owner of vocab size and block length
    (
        "missing_dataset",
        lambda c: train(c.yaml("data", dataset=str(c.tmp / "nods")) and c),
        "nods/metadata.json",
    ),
    ("vocab_stated_wrong", lambda c: train(c.yaml("model", vocab_size=1000) and c), "model.vocab_size=1000"),
    ("seq_len_stated_wrong", lambda c: train(c.yaml("data", seq_len=128) and c), "data.seq_len=128"),
    (
        "dataset_below_one_batch",
        lambda c: train(c.ds_json(train_batch_size=4096, train_micro_batch_size_per_gpu=4) and c),
        "fewer than one global batch (train_batch_size=4096)",
    ),
    (
        "empty_valid_split_with_eval",
        lambda c: train(c.copy_dataset(_mark_valid_empty) and c.yaml("train", eval_every=5) and c),
        "valid split is empty but train.eval_every=5",
    ),
    (
        "missing_tokenizer",
        lambda c: train(c.copy_dataset(drop="tokenizer") and c),
        "tokenizer folder missing",
    ),
    (
        "corrupt_metadata",
        lambda c: train(c.copy_dataset() and c.cfg and _corrupt_meta(c) and c),
        "corrupt metadata",
    ),
    ("truncated_shard", lambda c: train(_truncate_shard(c) and c), "missing or truncated shard (expected"),
    (
        "kernels_triton_on_cpu",
        lambda c: train(c.yaml("model", kernels="triton") and c),
        "model.kernels='triton'",
    ),
    # checkpoints and the run folder
    ("resume_missing", lambda c: train(c, "--resume", c.tmp / "none"), "checkpoint to resume from not found"),
    ("resume_incomplete", lambda c: train(c, "--resume", _incomplete(c)), "no COMPLETE marker"),
    (
        "resume_truncated_file",
        lambda c: train(
            c, "--resume", c.fake_checkpoint(files={"zero_pp_rank_0_mp_rank_00_model_states.pt": 999})
        ),
        "zero_pp_rank_0_mp_rank_00_model_states.pt: corrupt checkpoint file (100 bytes, 999 when saved)",
    ),
    (
        "resume_other_model",
        lambda c: train(c, "--resume", _with_model(c, num_heads=4)),
        "model.num_heads: 4 in the checkpoint, 2 now",
    ),
    (
        "resume_other_precision",
        lambda c: train(c, "--resume", c.fake_checkpoint(precision="bf16")),
        "was saved by a bf16 run and",
    ),
    ("run_folder_locked", lambda c: train(_lock(c) and c), "is in use by another run"),
    (
        "does_not_fit_in_memory",
        lambda c: train(_huge(c)),
        "does not fit on this node without GPUs: 64 ranks x",
    ),
    # prepare
    (
        "prepare_missing_relative_folder",
        lambda c: _prepare(c, "corpus/missing", "--out", c.tmp / "p"),
        "input not found: corpus/missing",
    ),
    (
        "prepare_vocab_too_small",
        lambda c: _prepare(c, _text(c), "--out", c.tmp / "p", "--vocab-size", 100),
        "--vocab-size 100",
    ),
    (
        "prepare_missing_tokenizer",
        lambda c: _prepare(c, _text(c), "--out", c.tmp / "p", "--tokenizer", "./notok"),
        "./notok",
    ),
    ("prepare_seq_len_4", lambda c: _prepare(c, _text(c), "--out", c.tmp / "p", "--seq-len", 4), "seq_len=4"),
    ("prepare_non_empty_out", lambda c: _prepare(c, _text(c), "--out", _non_empty(c)), "is not empty"),
    # export
    (
        "export_missing",
        lambda c: _export(c, c.tmp / "none", c.tmp / "hf"),
        "checkpoint to resume from not found",
    ),
    ("export_non_empty_out", lambda c: _export(c, c.tmp / "none", _non_empty(c)), "is not empty"),
    ("export_incomplete", lambda c: _export(c, _incomplete(c), c.tmp / "hf"), "no COMPLETE marker"),
]


def _huge(c):
    """A 4.8B-parameter model, 64 ranks on this node: refused by the memory preflight."""
    c.yaml("model", preset="large", hidden_size=4096, intermediate_size=16384)
    c.env.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="64")
    return c


def _corrupt_meta(c):
    (c.tmp / "ds_copy" / "metadata.json").write_text("{not json")
    return True


def _truncate_shard(c):
    from roberta_ds.data.dataset import PackedDataset

    d = c.copy_dataset()
    shard = d / PackedDataset(d).parts[0]["file"]  # the first train shard, whatever the layout
    shard.write_bytes(shard.read_bytes()[:-10])
    return True


def _incomplete(c):
    ck = c.tmp / "inc" / "checkpoints" / "step_00000010"
    ck.mkdir(parents=True)
    (ck.parent / "latest").write_text("step_00000010\n")
    return c.tmp / "inc"


def _lock(c):
    run = c.tmp / "run"
    run.mkdir()
    c.held = open(run / ".lock", "w")  # noqa: SIM115 (held by this test while train.py runs)
    fcntl.flock(c.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True


def _text(c):
    p = c.tmp / "docs.txt"
    p.write_text("one two three.\n\nfour five six.\n")
    return p


def _non_empty(c):
    d = c.tmp / "full"
    d.mkdir(exist_ok=True)
    (d / "keep.txt").write_text("previous work\n")
    return d


def _prepare(c, *args):
    (c.tmp / "corpus").mkdir(exist_ok=True)
    return ["-m", "roberta_ds.prepare", *map(str, args), "--no-progress"]


def _export(c, ckpt, out):
    return ["-m", "roberta_ds.export", "--checkpoint", str(ckpt), "--out", str(out)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_it(case, kjv_dataset, tmp_path):
    _, build, expected = case
    c = Ctx(tmp_path, kjv_dataset)
    argv = build(c)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "keep" in p.name}
    res = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env={**env(), "PYTHONPATH": str(ROOT), **c.env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    err = res.stderr
    assert res.returncode == 2, f"exit {res.returncode}\n{err[-3000:]}"
    assert expected in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert {p: p.read_bytes() for p in before} == before  # nothing previously written is lost
    assert not (tmp_path / "p.tmp").exists()  # a failed prepare leaves no <out>.tmp


def test_runtime_only_settings_may_change_when_resuming(kjv_dataset, tmp_path):
    """kernels / num_workers / cache_dir describe how a run runs, not what it trains."""
    from roberta_ds.config import load_run_config
    from roberta_ds.training.run_dir import check_run_dir

    cfg_path = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    cfg = load_run_config(cfg_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = cfg.to_dict()
    saved["model"]["kernels"], saved["data"]["num_workers"] = "triton", 4
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(cfg, run_dir)  # no error


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(kjv_dataset, tmp_path):
    """Upgrading roberta-ds must not orphan a run: a key its run_config.yaml lacks ran at the default."""
    from roberta_ds.config import ConfigError, load_run_config
    from roberta_ds.training.run_dir import check_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_run_config(write_config(tmp_path / "run.yaml", kjv_dataset, run_dir))
    saved = cfg.to_dict()
    del saved["data"]["masking"], saved["data"]["span_max"]  # keys added after that run started
    (run_dir / "run_config.yaml").write_text(yaml.safe_dump(saved))
    check_run_dir(cfg, run_dir)  # no error
    text = (tmp_path / "run.yaml").read_text().replace("data:\n", "data:\n  masking: span\n", 1)
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match="masking"):
        check_run_dir(load_run_config(tmp_path / "run.yaml"), run_dir)


def test_new_run_never_overwrites_another_runs_checkpoints(kjv_dataset, tmp_path):
    from roberta_ds.config import ConfigError, load_run_config
    from roberta_ds.training.run_dir import check_run_dir

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run_config.yaml").write_text(
        json.dumps({"model": {"hidden_size": 1}, "data": {}, "train": {}})
    )
    cfg = load_run_config(write_config(tmp_path / "run.yaml", kjv_dataset, run_dir))
    with pytest.raises(ConfigError, match="holds another run"):
        check_run_dir(cfg, run_dir)
    cfg = load_run_config(write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, resume=None))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        check_run_dir(cfg, run_dir)


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 40 and os.path.isfile(ROOT / "train.py")

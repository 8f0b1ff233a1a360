"""Checkpoints are immutable once complete, stale shards cannot survive, pruning counts complete
checkpoints only, a full disk is named; the run-folder lock; metrics.jsonl without duplicate steps."""

import errno
import json
import os
import subprocess
import sys

import pytest

from roberta_ds.training import checkpoint
from roberta_ds.training.checkpoint import CheckpointError, resolve, save


class FakeEngine:
    """engine.save_checkpoint as DeepSpeed lays it out: <dir>/<tag>/<per-rank shard files>."""

    def __init__(self, fail: Exception | None = None, payload: bytes = b"state"):
        self.calls, self.fail, self.payload = 0, fail, payload

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls += 1
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), "wb") as f:
            f.write(self.payload)
            if self.fail:
                raise self.fail


STATE = {"config": {"model": {"num_heads": 2}}}


def snapshot(root):
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_renames_a_complete_folder_and_never_rewrites_it(tmp_path):
    eng = FakeEngine()
    path = save(eng, tmp_path, 10, STATE, keep_last=3, rank=0)
    assert path.name == "step_00000010" and (path / "COMPLETE").is_file()
    info = json.loads((path / "COMPLETE").read_text())
    assert info["step"] == 10 and info["model"] == {"num_heads": 2}
    assert info["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 5
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    before = snapshot(tmp_path)
    save(FakeEngine(payload=b"other"), tmp_path, 10, STATE, keep_last=3, rank=0)  # rerun / signal mid-save
    assert snapshot(tmp_path) == before  # skipped: not one byte rewritten


def test_stale_shards_of_an_interrupted_save_cannot_survive(tmp_path):
    root = tmp_path / "checkpoints"
    stale_tmp = root / ".tmp-step_00000010-1-2"  # a 2-rank save killed mid-write
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"old")
    old_layout = root / "step_00000010"  # an older version wrote in place: no COMPLETE
    old_layout.mkdir()
    (old_layout / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"old")
    path = save(FakeEngine(), tmp_path, 10, STATE, keep_last=3, rank=0)  # re-saved by 1 rank
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "rng_rank00000.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    assert not stale_tmp.exists()


def test_prune_counts_complete_checkpoints_only_and_prunes_universal(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(FakeEngine(), tmp_path, step, STATE, keep_last=2, rank=0)
        (root / "universal" / checkpoint.tag_for(step)).mkdir(parents=True)
    (root / "step_00000004").mkdir()  # incomplete: must not push a complete one out
    save(FakeEngine(), tmp_path, 5, STATE, keep_last=2, rank=0)
    assert sorted(p.name for p in root.glob("step_*") if (p / "COMPLETE").exists()) == [
        "step_00000003",
        "step_00000005",
    ]
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["step_00000003"]
    assert (root / "latest").read_text().strip() == "step_00000005"


def test_save_aside_moves_neither_latest_nor_prunes(tmp_path):
    save(FakeEngine(), tmp_path, 1, STATE, keep_last=1, rank=0)
    aside = save(
        FakeEngine(),
        tmp_path,
        2,
        STATE,
        keep_last=1,
        rank=0,
        tag="nonfinite_step_00000002",
        make_latest=False,
    )
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001" and (root / "step_00000001").is_dir()
    assert (aside / "COMPLETE").is_file()


@pytest.mark.parametrize(
    "fail",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos 1465856 vs 1465744")],
    ids=["ENOSPC", "torch_zip_writer"],
)
def test_full_disk_is_named_and_leaves_no_checkpoint(tmp_path, fail):
    save(FakeEngine(), tmp_path, 1, STATE, keep_last=2, rank=0)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="no space left on device while writing a checkpoint"):
        save(FakeEngine(fail=fail), tmp_path, 2, STATE, keep_last=2, rank=0)
    root = tmp_path / "checkpoints"
    assert not (root / "step_00000002").exists() and not list(root.glob(".tmp-*"))
    assert snapshot(tmp_path) == before and resolve("auto", tmp_path).name == "step_00000001"


def test_truncated_file_of_a_complete_checkpoint_is_named(tmp_path):
    path = save(FakeEngine(), tmp_path, 1, STATE, keep_last=2, rank=0)
    shard = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"st")
    with pytest.raises(CheckpointError, match=r"optim_states\.pt: corrupt checkpoint file \(2 bytes, 5 when"):
        resolve("auto", tmp_path)
    assert checkpoint.corrupt_file(path) == shard  # what load() names when DeepSpeed fails


def test_run_folder_lock_is_exclusive_and_released_on_death(tmp_path):
    from roberta_ds.errors import RunDirInUse
    from roberta_ds.training.run_dir import lock

    code = (
        "import pathlib, time\n"
        "from roberta_ds.training.run_dir import lock\n"
        f"lock(pathlib.Path({str(tmp_path)!r}))\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirInUse, match=rf"{tmp_path} is in use by another run \(process {holder.pid} "):
        lock(tmp_path)
    holder.kill()
    holder.wait()
    os.close(lock(tmp_path))  # the OS released it when the holder died


def test_metrics_drop_rows_past_the_resumed_step(tmp_path):
    from roberta_ds.training.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in range(1, 8)] + [{"step": 5, "valid_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # killed mid-write
    log = MetricsLog(path, enabled=True, resume_step=5)
    log.write({"step": 6, "loss": 0.5})
    log.close()
    steps = [(r["step"], "loss" in r) for r in map(json.loads, path.read_text().splitlines())]
    assert steps == [(1, True), (2, True), (3, True), (4, True), (5, True), (5, False), (6, True)]


def test_dropout_seeds_do_not_collide_across_ranks_and_steps():
    from roberta_ds.training.engine import dropout_seed

    seeds = {dropout_seed(1234, step, rank) for step in range(3) for rank in range(2048)}
    assert len(seeds) == 3 * 2048  # the old seed*1_000_003 + step*1_009 + rank collided past 1009 ranks


def test_bfloat16_alias_is_bf16():
    from roberta_ds.training.ds_config import precision

    assert precision({"bfloat16": {"enabled": True}}) == "bf16"


def test_run_config_yaml_is_accepted_back_as_config(tmp_path):
    import yaml

    from roberta_ds.config import load_run_config

    cfg = load_run_config(None, {"train": {"max_steps": 7}})  # an override into an absent section
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = load_run_config(path)
    assert again.to_dict() == cfg.to_dict() and again.train.max_steps == 7
    path.write_text("train:\nmodel:\n")  # empty sections plus a command-line override
    assert load_run_config(path, {"train": {"max_steps": 3}}).train.max_steps == 3


def test_resume_with_another_model_config_names_the_field(tmp_path):
    from roberta_ds.training.checkpoint import check_resume_model

    path = save(FakeEngine(), tmp_path, 1, STATE, keep_last=2, rank=0)
    check_resume_model(path, {"num_heads": 2, "kernels": "triton"})
    with pytest.raises(CheckpointError, match="model.num_heads: 2 in the checkpoint, 4 now"):
        check_resume_model(path, {"num_heads": 4})


def test_precision_is_recorded_and_a_change_is_refused_by_name(tmp_path):
    path = save(FakeEngine(), tmp_path, 10, {**STATE, "precision": "bf16"}, keep_last=2, rank=0)
    assert checkpoint.manifest(path)["precision"] == "bf16"
    checkpoint.check_precision(path, "bf16", "ds.json")
    with pytest.raises(CheckpointError, match="saved by a bf16 run and ds.json is fp32"):
        checkpoint.check_precision(path, "fp32", "ds.json")


class MissingFileEngine:
    """engine.load_checkpoint as DeepSpeed fails when the optimizer files are another precision's."""

    def __init__(self, wants: str):
        self.wants = wants

    def load_checkpoint(self, load_dir, tag, **kw):
        path = os.path.join(load_dir, tag, self.wants)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)


@pytest.mark.parametrize(
    ("saved", "wanted"),
    [
        ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ],
)
def test_old_checkpoint_of_another_precision_is_named_on_load(tmp_path, saved, wanted):
    """Saved before the manifest held precision: the bf16/non-bf16 twin of the missing file tells."""
    ckpt = tmp_path / "step_00000010"
    ckpt.mkdir()
    (ckpt / saved).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=f"another precision \\({wanted} is missing\\)"):
        checkpoint.load(MissingFileEngine(wanted), ckpt, rank=0)
    with pytest.raises(CheckpointError) as e:  # a file simply gone is not that
        checkpoint.load(MissingFileEngine("mp_rank_00_model_states.pt"), ckpt, rank=0)
    assert "another precision" not in str(e.value) and "mp_rank_00_model_states.pt" in str(e.value)


def test_resume_from_a_folder_that_never_held_a_checkpoint_says_so(tmp_path):
    never = tmp_path / "run_never_saved"
    (never / "tensorboard").mkdir(parents=True)
    (never / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="holds no checkpoint") as e:
        resolve(str(never), tmp_path / "other")
    assert "interrupted" not in str(e.value)
    cut = tmp_path / "run" / "checkpoints" / "step_00000010"  # a save cut short keeps its message
    cut.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="the save was interrupted"):
        resolve(str(cut), tmp_path / "other")


def test_loadable_converts_only_another_worlds_checkpoint(tmp_path, monkeypatch):
    """The Trainer asks for the loadable path before it builds the engine (the conversion's host
    memory never adds to the engine's); only a checkpoint of another world size is converted."""
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    for r in (0, 1):
        (ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").touch()
    converted = []
    monkeypatch.setattr(
        checkpoint, "to_universal", lambda c: converted.append(c) or c.parent / "universal" / c.name
    )
    assert checkpoint.Checkpointer(tmp_path, 0, 1, rank=0, world=2).loadable(ckpt) == ckpt
    assert converted == []
    out = checkpoint.Checkpointer(tmp_path, 0, 1, rank=0, world=1).loadable(ckpt)
    assert converted == [ckpt] and out == tmp_path / "checkpoints" / "universal" / "step_00000004"

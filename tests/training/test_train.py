"""End-to-end training on CPU with 2 processes (gloo): ZeRO-3 learns, resume is exact, a 2-rank
checkpoint resumes on 1 rank, a signal checkpoints and exits, export reloads in transformers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.conftest import ROOT, env, launch, launch_cmd, losses, write_config, write_ds

pytestmark = pytest.mark.multiproc


def ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.fixture(scope="module")
def reference_run(kjv_dataset, tmp_path_factory):
    """30 uninterrupted ZeRO-3 steps on 2 torchrun processes."""
    d = tmp_path_factory.mktemp("ref")
    cfg = write_config(d / "run.yaml", kjv_dataset, d / "run")
    ds = write_ds(d / "ds.json")
    ok(launch("torchrun", 2, cfg, ds))
    return d / "run", cfg, ds


def test_zero3_two_processes_lower_the_loss(reference_run):
    run_dir, _, _ = reference_run
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 31))
    first, last = sum(loss[s] for s in range(1, 4)) / 3, sum(loss[s] for s in range(28, 31)) / 3
    assert last < first - 0.5, (first, last)  # ln(512) = 6.2 at start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in rows[0]
    assert rows[0]["lr"] < rows[4]["lr"] and rows[-1]["lr"] < rows[10]["lr"]  # warmup, then decay
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    monitor = (
        (run_dir / "monitor" / "train" / "Train_loss.csv").read_text().splitlines()
    )  # DeepSpeed's CSV monitor
    assert len(monitor) >= 30
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000010", "step_00000020", "step_00000030"]


def test_sigkill_and_resume_reproduces_losses_exactly_with_deepspeed_launcher(reference_run, tmp_path):
    ref_dir, _, ds = reference_run
    cfg = write_config(tmp_path / "run.yaml", _dataset_of(ref_dir), tmp_path / "run")
    cmd = launch_cmd("deepspeed", 2, cfg, ds)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and max(losses(metrics.parent), default=0) >= 13):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to save: resume must come from step 10's checkpoint
    proc.wait()
    killed_at = max(losses(tmp_path / "run"))
    assert 13 <= killed_at < 30
    ok(launch("deepspeed", 2, cfg, ds))
    assert losses(tmp_path / "run") == losses(ref_dir)  # bit-for-bit equal per-step losses (fp32)


def _dataset_of(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "run_config.yaml").read_text())["data"]["dataset"]


def test_resume_two_rank_checkpoint_on_one_rank(reference_run, tmp_path):
    run_dir, cfg, ds = reference_run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg2 = write_config(tmp_path / "run.yaml", _dataset_of(run_dir), copy, max_steps=33)
    res = launch("python", 1, cfg2, ds)
    ok(res)
    assert "resuming a 2-rank checkpoint on 1 ranks" in res.stderr + res.stdout
    assert sorted(losses(copy))[-3:] == [31, 32, 33]


def test_export_reloads_in_transformers_with_equal_logits(reference_run, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from roberta_ds.config import ModelConfig
    from roberta_ds.export import consolidated_state_dict, export
    from roberta_ds.model import RobertaMLM

    run_dir, _, _ = reference_run
    out = export(run_dir, tmp_path / "hf")
    hf = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    import yaml

    ours = RobertaMLM(
        ModelConfig(**yaml.safe_load((run_dir / "run_config.yaml").read_text())["model"])
    ).eval()
    ours.load_state_dict(consolidated_state_dict(run_dir / "checkpoints" / "step_00000030"))
    enc = tok(["And God said, Let there be <mask>.", "In the beginning"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = hf(**enc).logits
        b = ours(enc["input_ids"], enc["attention_mask"]).logits
    assert (a - b).abs().max().item() <= 1e-4
    from transformers import pipeline

    assert len(pipeline("fill-mask", model=str(out))("And God said, Let there be <mask>.")) == 5


def test_export_overwrite_swaps_in_a_complete_folder(reference_run, tmp_path, monkeypatch):
    """Re-exporting (the Quickstart does on every run) replaces the folder whole: no stale file of
    the old export survives, and an export that fails midway leaves the previous one untouched."""
    import roberta_ds.export as export_mod

    run_dir, _, _ = reference_run
    out = export_mod.export(run_dir, tmp_path / "hf")
    (out / "stale.txt").write_text("from an older export")
    weights = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(sd, cfg, out_dir, tokenizer=None):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "save_hf_state_dict", broken)
    with pytest.raises(OSError):
        export_mod.export(run_dir, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left behind
    monkeypatch.undo()

    export_mod.export(run_dir, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_signal_mid_run_checkpoints_and_resumes(kjv_dataset, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=400, save_every=0)
    ds = write_ds(tmp_path / "ds.json")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--deepspeed_config", str(ds)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what `sbatch --signal=USR1@...` / `scancel --signal=USR1` deliver
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 99, out[-3000:]
    stopped = max(losses(tmp_path / "run"))
    assert stopped < 400
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    res = launch("python", 1, cfg, ds, "--max_steps", str(stopped + 3))
    ok(res)
    assert sorted(losses(tmp_path / "run"))[-3:] == [stopped + 1, stopped + 2, stopped + 3]


def test_nonfinite_losses_skip_steps_then_stop_with_checkpoint(kjv_dataset, tmp_path):
    cfg = write_config(
        tmp_path / "run.yaml",
        kjv_dataset,
        tmp_path / "run",
        max_steps=20,
        max_nonfinite_steps=3,
        save_every=2,
    )
    ds = write_ds(tmp_path / "ds.json")
    script = tmp_path / "nan_train.py"
    script.write_text(
        "import sys, torch\n"
        "from roberta_ds.model.roberta import RobertaMLM\n"
        "orig = RobertaMLM.forward\n"
        "calls = [0]\n"
        "def forward(self, *a, **k):\n"
        "    out = orig(self, *a, **k)\n"
        "    calls[0] += 1\n"
        "    if calls[0] > 4 and out.loss is not None and self.training:\n"
        "        out = out._replace(loss=out.loss * float('nan'))\n"
        "    return out\n"
        "RobertaMLM.forward = forward\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "sys.exit(train.main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [sys.executable, str(script), "--config", str(cfg), "--deepspeed_config", str(ds)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 98, res.stderr[-3000:]
    # 1 process, micro 4, global 8: 2 forwards per step, so NaN losses start at step 3
    assert "3 consecutive non-finite losses at step 5" in res.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 3  # DeepSpeed discarded those updates
    # saved aside; latest stays on the last good checkpoint and nothing is pruned
    ckpts = tmp_path / "run" / "checkpoints"
    assert os.path.isfile(ckpts / "nonfinite_step_00000005" / "COMPLETE")
    assert not (ckpts / "step_00000005").exists() and not (ckpts / "step_00000004").exists()  # loss NaN
    assert (ckpts / "latest").read_text().strip() == "step_00000002" and (ckpts / "step_00000002").is_dir()


def test_continued_pretraining_from_a_hugging_face_folder(kjv_dataset, tmp_path):
    """init_from_hf loads the weights into the ZeRO-3-partitioned model (lr 0 keeps them as they are)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from roberta_ds.export import consolidated_state_dict
    from roberta_ds.model.hf import state_dict_from_hf

    hf = RobertaForMaskedLM(
        RobertaConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=66,
            type_vocab_size=1,
        )
    )
    hf.save_pretrained(tmp_path / "hf")
    cfg = write_config(
        tmp_path / "run.yaml",
        kjv_dataset,
        tmp_path / "run",
        max_steps=1,
        lr=0.0,
        init_from_hf=str(tmp_path / "hf"),
    )
    ok(launch("python", 1, cfg, write_ds(tmp_path / "ds.json")))
    got = consolidated_state_dict(tmp_path / "run" / "checkpoints" / "step_00000001")
    want = state_dict_from_hf(hf.state_dict(), 2)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k].float()), k


def test_wall_clock_limit_checkpoints_and_exits_99(kjv_dataset, tmp_path):
    cfg = write_config(
        tmp_path / "run.yaml",
        kjv_dataset,
        tmp_path / "run",
        max_steps=1000,
        save_every=0,
        time_limit_minutes=0.25,  # 15 s: past the build (several seconds on a loaded machine)
    )
    res = launch("python", 1, cfg, write_ds(tmp_path / "ds.json"))
    assert res.returncode == 99, res.stderr[-3000:]
    assert "time limit" in res.stderr
    stopped = max(losses(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert (tmp_path / "run" / "PREEMPTED").is_file()


@pytest.mark.slow
def test_shipped_offload_config_trains(kjv_dataset, tmp_path):
    """zero3_offload.json's ZeRO section (optimizer and parameters on the CPU, DeepSpeed's CPU Adam,
    compiled on first use) with CPU-sized batches and fp32."""
    shipped = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    ds = write_ds(tmp_path / "ds.json", zero_optimization=shipped["zero_optimization"])
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run", max_steps=4, save_every=2)
    res = launch("python", 1, cfg, ds, timeout=600)
    ok(res)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"

"""The ZeRO communication / memory / step-time model (roberta_ds.benchmarks.scaling): its bytes
against DeepSpeed's own comms logger on 1, 2 and 4 CPU ranks for every stage, and its table."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roberta_ds.benchmarks import scaling
from roberta_ds.config import model_preset

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
@pytest.mark.parametrize("world,precision", [(1, "fp32"), (2, "bf16"), (4, "fp32")])  # bf16 as on GPUs
def test_comms_model_matches_deepspeed_comms_logger(tmp_path, world, precision):
    out = tmp_path / "comms.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={free_port()}", "-m", "roberta_ds.bench", "comms", "--stages", "1,2,3",
           "--grad-accum", "2", "--out", str(out)]  # fmt: skip
    if precision == "bf16":
        cmd += ["--bf16", "--overlap-comm"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    rows = json.loads(out.read_text())
    assert [r["stage"] for r in rows] == [1, 2, 3] and all(r["world_size"] == world for r in rows)
    for r in rows:
        measured, modelled = r["measured"], r["modelled"]
        tensor_bytes = sum(modelled.values())
        assert tensor_bytes > 0
        for op, want in modelled.items():
            got = measured.get(op, 0.0)
            if want:
                assert abs(got - want) <= 0.05 * want, (r["stage"], op, got, want)
            else:
                # Not in the model: the scalar all-reduces of the overflow flag and the gradient
                # norm (8-16 bytes a step), nothing at the preset sizes.
                assert got <= 0.01 * tensor_bytes, (r["stage"], op, got)
        # ZeRO-3 broadcasts a few hundred bytes of trace bookkeeping in some steps: also < 1%.
        assert sum(v for op, v in measured.items() if op not in modelled) <= 0.01 * tensor_bytes, measured


def test_memory_model_follows_the_stages():
    cfg = model_preset("large")
    ds = {s: json.loads((ROOT / "ds_configs" / f"zero{s}_bf16.json").read_text()) for s in (1, 2, 3)}
    P = sum(scaling.param_numels(cfg))
    assert 350e6 < P < 360e6  # RoBERTa-large
    mem = {s: scaling.memory_per_rank(cfg, ds[s], 8, 32, 512) for s in (1, 2, 3)}
    assert mem[1].optimizer == pytest.approx(12 * P / 8)  # fp32 master + two Adam moments, sharded
    assert mem[2].grads < mem[1].grads
    assert mem[3].params > mem[2].params  # the shipped ZeRO-3 config keeps the whole model gathered
    assert mem[1].activations_ckpt < mem[1].activations / 4
    assert mem[1].total(checkpointing=False) < 80 * 2**30  # large, micro-batch 32, seq 512 on 80 GB


def test_step_time_uses_the_static_report_when_there_is_one(tmp_path):
    cfg = model_preset("base")
    ms, source = scaling.compute_ms("base", cfg, 512, 32, tmp_path)
    assert source.startswith("FLOPs") and ms > 0
    (tmp_path / "sm90_steps_triton3.6.0.json").write_text(
        json.dumps([{"config": "base s512 p0.1", "micro_batch": 32, "modelled_ms": 40.0}])
    )
    assert scaling.compute_ms("base", cfg, 512, 16, tmp_path) == (20.0, "sm90_steps_triton3.6.0.json")


def test_scaling_cli_prints_the_table_and_draws_the_plot(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "roberta_ds.bench", "scaling", "--gpus", "8,64,512", "--csv",
         str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert {(r["preset"], r["zero"], r["gpus"]) for r in rows} == {
        (p, z, g) for p in ("base", "large") for z in "123" for g in ("8", "64", "512")
    }
    assert all(float(r["step_ms"]) >= float(r["compute_ms"]) for r in rows)
    assert "fastest" in res.stdout and (tmp_path / "s.png").stat().st_size > 0

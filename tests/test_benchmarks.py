"""The benchmark entry points run and write their rows (CPU smoke; the numbers come from a GPU)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, env=None, timeout=600):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout
    )


def test_kernel_bench_smoke(tmp_path):
    res = run(
        [
            "kernel_tools.bench",
            "--smoke",
            "--dtype",
            "fp32",
            "--kernels",
            "layer_norm,cross_entropy",
            "--csv",
            str(tmp_path / "k.csv"),
            "--plot-dir",
            str(tmp_path),
        ],
        env={"TRITON_INTERPRET": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "k.csv").open()))
    assert {r["kernel"] for r in rows} == {"layer_norm", "cross_entropy"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"} and all(
        r["commit"] and r["device"] for r in rows
    )
    assert (tmp_path / "layer_norm.png").stat().st_size > 0


def test_kernel_bench_refuses_cpu_without_smoke():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "kernel_tools.bench"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr


@pytest.mark.multiproc
def test_data_bench(tmp_path, kjv_dataset):
    corpus = kjv_dataset.parent / "kjv.jsonl"
    res = run(
        [
            "roberta_ds.bench",
            "data",
            "--corpus",
            str(corpus),
            "--tokenizer",
            "gpt2",
            "--seq-len",
            "128",
            "--num-proc",
            "1",
            "--repeats",
            "1",
            "--csv",
            str(tmp_path / "d.csv"),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "d.csv").open()))
    rows = [r for r in rows if not r["method"].startswith("datatrove")]  # there when it is installed
    ours, hf = rows[0], rows[-1]  # 1 worker, (--num-proc workers, a resumed run,) run_mlm.py's way
    assert ours["method"].startswith("roberta-ds prepare, 1 worker") and hf["method"].startswith("run_mlm")
    # the same tokens on both sides: ours has one </s> per document, run_mlm.py <s> and </s>
    assert 3 <= len(rows) <= 4 and int(hf["tokens"]) - int(ours["tokens"]) == 150
    assert float(ours["token_bytes_per_token"]) < float(hf["token_bytes_per_token"])
    # the stages prepare timed, and the serial share they make of the run
    stages = sum(float(ours[f"{k}_s"]) for k in ("startup", "plan", "tokenizer", "tokenize", "finalize"))
    assert 0.5 * float(ours["seconds"]) < stages <= float(ours["seconds"]) + 0.01
    assert 0 < float(ours["serial_fraction"]) < 1
    # one worker: its tasks fill the stage (log times are rounded to 10 ms per task)
    assert 0 < float(ours["task_s"]) <= float(ours["tokenize_s"]) + 0.005 * int(ours["tasks"])
    assert 0.5 < float(ours["pool_utilisation"]) <= 1.1
    assert "speedup" in res.stdout and "stages in seconds" in res.stdout


def test_data_bench_serial_fraction_and_amdahl():
    """Measured stages -> serial share -> Amdahl, against figures worked by hand: 100 s on one
    worker at 100 MB, of which 4 s fixed (start-up, tokenizer) and 1 s per-task (plan, finalize)."""
    from roberta_ds.benchmarks.data import scaling_summary

    one = {"seconds": 100.0, "startup_s": 1.0, "tokenizer_s": 3.0, "plan_s": 0.5, "finalize_s": 0.5}
    s = scaling_summary(one, {"seconds": 55.0}, 2, int(100e6))
    assert s["speedup"] == pytest.approx(100 / 55) and s["efficiency"] == pytest.approx(100 / 110)
    assert s["serial_fraction"] == pytest.approx(0.05)
    assert s["efficiency_64"] == pytest.approx(1 / (0.05 * 64 + 0.95))  # 0.2424
    # 160 GB = 1,600x: tokenize 95 s -> 152,000 s, plan + finalize 1 s -> 1,600 s, fixed 4 s
    f = 1604 / (1604 + 152_000)
    assert s["serial_fraction_160gb"] == pytest.approx(f)
    assert s["efficiency_1024_160gb"] == pytest.approx(1 / (f * 1024 + 1 - f))
    assert s["karp_flatt"] == pytest.approx(2 / (100 / 55) - 1)
    assert s["pool_utilisation"] is None  # no task times given


def test_data_bench_reads_the_task_times_from_the_logs(tmp_path):
    from roberta_ds.benchmarks.data import task_seconds

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "task_00000.log").write_text(
        "t vm pid 1: tokenize start a bytes [0, 9)\nt vm pid 1: tokenize done in 2.5s: 3 documents\n"
        "t vm pid 2: tokenize done in 1.25s: 3 documents\n"  # a rerun's second attempt
    )
    (tmp_path / "logs" / "task_00001.log").write_text("t vm pid 1: sample done in 9.0s: 1 documents kept\n")
    assert task_seconds(tmp_path) == pytest.approx(3.75)


@pytest.mark.multiproc
def test_e2e_bench_tiny_on_cpu(tmp_path):
    res = run(
        [
            "roberta_ds.bench",
            "e2e",
            "--presets",
            "tiny",
            "--seq-lens",
            "32",
            "--impls",
            "ours-torch,hf-sdpa",
            "--micro-batch",
            "4",
            "--deepspeed_config",
            "ds_configs/cpu_zero3.json",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--csv",
            str(tmp_path / "e.csv"),
            "--plot",
            str(tmp_path / "e.png"),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "e.json").read_text())
    assert [r["impl"] for r in rows] == ["ours-torch", "hf-sdpa"]
    assert all(r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 for r in rows)
    assert (tmp_path / "e.png").stat().st_size > 0


def test_scaling_table_is_rendered_from_the_csvs_latest_run(tmp_path):
    """The docs' scaling table comes from the CSV: the latest run only (an older commit's rows and a
    repeated row are left out), figures rounded half up as written (0.345 -> 35%, 44,634 -> 45K)."""
    from roberta_ds import bench

    fields = ["preset", "zero", "gpus", "micro_batch", "grad_accum", "compute_ms", "tokens_per_s_per_gpu",
              "comm_efficiency", "compute_source", "ds_config", "commit"]  # fmt: skip
    old = ["base", 1, 8, 32, 8, 177.15, 737256, 0.996, "FLOPs at 45% MFU", "z1.json", "aaaaaaa"]
    run = [
        ["base", 1, 8, 32, 8, 170.56, 765635, 0.996, "sm90_steps_triton3.9.0.json", "z1.json", "bbbbbbb"],
        ["base", 3, 8, 32, 8, 170.56, 538264, 0.7, "sm90_steps_triton3.9.0.json", "z3.json", "bbbbbbb"],
        ["base", 1, 512, 4, 1, 2.67, 44634, 0.175, "sm90_steps_triton3.9.0.json", "z1.json", "bbbbbbb"],
        ["base", 3, 512, 4, 1, 2.67, 107447, 0.345, "sm90_steps_triton3.9.0.json", "z3.json", "bbbbbbb"],
    ]
    with open(tmp_path / "s.csv", "w", newline="") as f:
        csv.writer(f).writerows([fields, old, *run, run[0]])
    assert bench.main(["scaling", "--tables-only", "--csv", str(tmp_path / "s.csv")]) == 0
    head, table = (tmp_path / "s.md").read_text().split("\n\n")
    assert "commit bbbbbbb" in head and "H100" in head and "`sm90_steps_triton3.9.0.json`" in head
    assert "seq 512" in head and "global batch 2048" in head and "base 21.3 ms" in head
    assert table.splitlines()[0].endswith(
        "| micro-batch x accumulation | compute / step time, ZeRO-1 / ZeRO-3 |"
    )
    assert table.splitlines()[0].startswith("| model | GPUs | ZeRO-1 | ZeRO-3 |")
    assert table.splitlines()[1:] == [
        "|---|---|---|---|---|---|",
        "| base | 8 | 766K | 538K | 32 x 8 | 100% / 70% |",
        "| base | 512 | 45K | 107K | 4 x 1 | 18% / 35% |",
    ]

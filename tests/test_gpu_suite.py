"""scripts/gpu_suite.sh --dry-run on CPU: every stage runs at tiny shapes and leaves its files, the
summary names every stage, and a second call skips what finished and redoes what did not."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# in the order gpu_suite.sh runs them
STAGES = ["env", "gpu_tests", "kernels", "e2e_zero3", "convergence", "calibration", "e2e_zero1", "e2e_zero2",
          "max_batch"]  # fmt: skip
FILES = {  # what each stage must leave besides log.txt, seconds, rc and DONE
    "env": ["env.json"],
    "gpu_tests": ["junit.xml"],
    "kernels": ["kernels.csv", "layer_norm.png"],
    "e2e_zero3": ["base.csv", "base.json", "base.png", "large.csv", "large.json", "large.png"],
    "e2e_zero1": ["base.csv", "base.json", "large.csv", "large.json"],
    "e2e_zero2": ["base.csv", "base.json", "large.csv", "large.json"],
    "max_batch": ["large.csv", "large.json"],
    "convergence": ["convergence.csv", "convergence.json", "convergence.png"],
    "calibration": ["sm90_report.md", "sm90_report.csv"],
}


def suite(out: Path, dataset: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", SUITE_DATASET=str(dataset), SUITE_SECONDS="900")
    env.pop("TRITON_INTERPRET", None)  # the script sets it where a stage needs the interpreter
    cmd = ["bash", str(ROOT / "scripts" / "gpu_suite.sh"), "--dry-run", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.multiproc
def test_dry_run_writes_every_stage_and_a_rerun_continues(kjv_dataset, tmp_path):
    out = tmp_path / "suite"
    res = suite(out, kjv_dataset)
    logs = {s: (out / s / "log.txt").read_text()[-2000:] for s in STAGES if (out / s / "log.txt").exists()}
    assert res.returncode == 0, res.stdout + res.stderr + json.dumps(logs, indent=1)
    for stage, files in FILES.items():
        for name in ["DONE", "log.txt", "seconds", "rc", *files]:
            assert (out / stage / name).is_file(), f"{stage}/{name} missing"
    assert {"commit", "device", "torch", "deepspeed"} <= set(
        json.loads((out / "env" / "env.json").read_text())
    )
    curves = (out / "convergence" / "convergence.csv").read_text().splitlines()
    assert curves[0] == "step,roberta_ds,transformers" and len(curves) == 11
    summary = (out / "SUMMARY.md").read_text()
    for stage in STAGES:
        assert f"## {stage}\n\nStatus: done" in summary, stage

    (out / "env" / "DONE").unlink()  # as if the first call had stopped inside this stage
    again = suite(out, kjv_dataset)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[env] running" in again.stdout
    for stage in STAGES[1:]:
        assert f"[{stage}] done in an earlier call: skipped" in again.stdout
    assert (out / "env" / "DONE").is_file()

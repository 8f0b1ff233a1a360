"""slurm/prepare.sbatch on the real 2-node test cluster: an array of 4 task groups, then the dependent
finalize job, gives the dataset a single local worker makes, byte for byte."""

import pytest

from roberta_ds.data.prepare import prepare
from tests.data.prepared import ROOT, dataset_files, kjv_jsonl

pytestmark = pytest.mark.multiproc
ARGS = ["--vocab-size", "400", "--seq-len", "64", "--valid-fraction", "0.05", "--task-bytes", str(1 << 20)]
ARGS += ["--tokenizer-sample-bytes", "400000", "--no-progress"]


def test_array_of_four_then_finalize_equals_one_local_worker(cluster, tmp_path):
    corpus = kjv_jsonl(tmp_path / "kjv.jsonl")
    local = prepare(
        [str(corpus)], tmp_path / "local", vocab_size=400, seq_len=64, valid_fraction=0.05,
        task_bytes=1 << 20, tokenizer_sample_bytes=400_000, workers=1, progress=False,
    )  # fmt: skip
    out = tmp_path / "slurm"
    common = ["--cpus-per-task=1", "--time=10", f"--output={tmp_path}/prep-%A_%a.out"]
    args = ["slurm/prepare.sbatch", str(corpus), "--out", str(out), *ARGS]
    env = {"OMP_NUM_THREADS": "1"}
    array = cluster.sbatch([*common, "--array=0-3", "--nodes=1", *args], cwd=ROOT, env=env)
    final = cluster.sbatch([*common, f"--dependency=afterany:{array}", *args], cwd=ROOT, env=env)
    info = cluster.wait_job(final, timeout=400)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(tmp_path.glob("prep-*.out")))
    assert info["JobState"] == "COMPLETED", logs
    assert len(list(tmp_path.glob(f"prep-{array}_*.out"))) == 4  # four array tasks ran
    assert dataset_files(out) == dataset_files(local)

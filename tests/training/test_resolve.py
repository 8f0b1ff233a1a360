"""The resolve stage (training/resolve.py): every fact of a run read from its owner before any
process group exists, frozen, and written to the run folder; the built-in corpus prepared by every
rank at once without a process group."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from roberta_ds.config import load_run_config
from roberta_ds.training.resolve import resolve_run, write_run_folder
from tests.data.prepared import ROOT, dataset_files, kjv_jsonl
from tests.training.conftest import write_config

DS = str(ROOT / "ds_configs" / "cpu_zero1.json")


def test_the_run_is_resolved_from_its_owners_and_written_once(kjv_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher says: the batch arithmetic's world
    monkeypatch.setenv("RANK", "0")
    cfg = load_run_config(write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run"))
    before = cfg.to_dict()
    run = resolve_run(cfg, DS)
    meta = json.loads((kjv_dataset / "metadata.json").read_text())
    assert cfg.to_dict() == before  # the loaded config is not rewritten
    assert (
        run.cfg.model.vocab_size == meta["vocab_size"] and run.cfg.data.seq_len == meta["seq_len"]
    )  # the dataset's
    ds = json.loads(Path(DS).read_text())
    assert run.global_batch == run.micro_batch * run.accum * 2
    assert run.micro_batch == ds["train_micro_batch_size_per_gpu"] and run.world == 2
    assert run.resume is None and run.precision == "fp32" and run.folders == (kjv_dataset,)
    assert run.zero_stage == ds["zero_optimization"]["stage"] and not run.offload
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.world = 1
    # written once the engine is built: a session that fails before leaves the folder as it was
    assert not (tmp_path / "run" / "run_config.yaml").exists()
    write_run_folder(run)
    saved = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert saved == run.cfg.to_dict()
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text()) == run.ds
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    os.close(run.lock)  # rank 0 holds the run folder from resolve on


PREPARE = """
import json, sys
from roberta_ds.config import load_run_config
from roberta_ds.training.resolve import dataset_folders
cfg = load_run_config(None, {"data": {"cache_dir": sys.argv[1], "vocab_size": 400, "seq_len": 64}})
print(json.dumps([str(f) for f in dataset_folders(cfg, local_world=2, show_progress=False)]))
"""


@pytest.mark.multiproc
def test_every_rank_prepares_the_builtin_corpus_at_once_and_each_task_runs_once(tmp_path):
    """Two ranks of a fresh node reach the built-in corpus together (no process group yet): one
    tokenizer, each task tokenized once, one metadata.json, and the dataset one process makes."""
    corpus = kjv_jsonl(tmp_path / "corpus.jsonl")  # the corpus file (written once, then reused)
    cache = tmp_path / "cache"  # one path for both runs: the dataset records its inputs' paths

    def ranks(n: int) -> list[Path]:
        cache.mkdir()
        shutil.copy2(corpus, cache / "builtin_corpus.jsonl")  # same bytes and mtime: same stamps
        cmd = [sys.executable, "-c", PREPARE, str(cache)]
        procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        outs = [p.communicate(timeout=300)[0] for p in procs]  # a prepare of ~4 MB: seconds
        assert [p.returncode for p in procs] == [0] * n
        return [Path(json.loads(o.strip().splitlines()[-1])[0]) for o in outs]

    (alone,) = ranks(1)
    alone = alone.rename(tmp_path / "alone")
    shutil.rmtree(cache)
    folders = ranks(2)
    assert folders[0] == folders[1]
    out = folders[0]
    done = [line for log in out.glob("logs/task_*.log") for line in log.read_text().splitlines()]
    tasks = json.loads((out / "tasks.json").read_text())["tasks"]
    assert sum("tokenize done" in line for line in done) == len(tasks)  # no task done twice
    assert not list(out.glob("metadata.json.*")) and not list(out.glob("tokenizer.tmp*"))
    assert dataset_files(out) == dataset_files(alone)

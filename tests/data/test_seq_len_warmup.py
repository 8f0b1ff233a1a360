"""Sequence-length warmup (data.seq_len_schedule): short blocks cut from the prepared stream, the
sampler, tokens, MFU and the lr across the switch, and exact resume across it (with a mixture)."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from roberta_ds.config import ConfigError, ModelConfig, load_run_config
from roberta_ds.data.dataset import PackedDataset
from roberta_ds.data.prepare import prepare
from roberta_ds.data.sampler import BlockOrder, GlobalOrderSampler, seq_len_at
from roberta_ds.model.roberta import flops_per_token
from tests.training.conftest import launch, losses, write_config, write_ds


def test_seq_len_at_given_steps():
    sched = [[0, 128], [9000, 512]]
    assert [seq_len_at(sched, s, 512) for s in (0, 8999, 9000, 10**6)] == [128, 128, 512, 512]
    assert seq_len_at(None, 5, 512) == 512


def test_short_blocks_cut_the_same_stream_across_shards(kjv_dataset, tmp_path):
    """Blocks of 24 from 64-token prepared blocks in many shards (prepare tasks of 20 KB of input):
    <s> + 22 stream tokens + </s>, every token served once, in order, across prepared-block and shard
    boundaries."""
    src = json.loads((kjv_dataset / "metadata.json").read_text())["settings"]["inputs"]
    out = prepare(src, tmp_path / "ds", tokenizer=str(kjv_dataset / "tokenizer"), seq_len=64, valid_every=15,
                  task_bytes=20_000, num_proc=1, progress=False)  # fmt: skip
    full, short = PackedDataset(out), PackedDataset(out, seq_len=24)
    assert len(full.parts) > 2 and len(short) == -(-full.num_tokens // 22)
    doc_offsets = np.concatenate([short._doc_starts(k) for k in range(len(short.parts))])

    def body(ds, i):
        ids = ds[i]["input_ids"]
        assert ids[0] == ds.bos
        n = int((ids != ds.pad).sum()) - 2
        assert ids[n + 1] == ds.eos
        return ids[1 : n + 1]

    stream_full = torch.cat([body(full, i) for i in range(len(full))])
    stream_short = torch.cat([body(short, i) for i in range(len(short))])
    assert torch.equal(stream_full, stream_short)  # no token dropped or repeated
    # document numbers start at 0 in each block and match the stream's document offsets
    for i in (0, 7, 8, len(short) - 1):
        seg, n = short[i]["segment_ids"], len(body(short, i))
        docs = np.searchsorted(doc_offsets, 22 * i + np.arange(n), side="right")
        assert seg[0] == 0 and seg[1 : n + 1].tolist() == (docs - docs[0]).tolist()


def test_sampler_serves_each_phase_its_own_length():
    sizes = {(0, 512): 100, (0, 128): 410}  # the prepared view first: its stream is the legacy one
    order = BlockOrder(sizes, [[0, 128], [3, 512]], 8, seed=2, native_len=512)
    it = iter(GlobalOrderSampler(510, 8, 4, 1, 0, seed=2, order=order))
    mbs = [next(it) for _ in range(12)]  # 6 steps: 3 short, 3 long
    short = [i for mb in mbs[:6] for _, i in mb]
    long = [i for mb in mbs[6:] for _, i in mb]
    assert all(i >= 100 for i in short) and all(i < 100 for i in long) and len(set(short)) == 24
    # the long phase starts the prepared view's usual stream at its first position
    legacy = iter(GlobalOrderSampler(100, 8, 4, 1, 0, seed=2))
    assert [i for _, i in mbs[6]] == [i for _, i in next(legacy)]


def test_schedule_is_validated(tmp_path):
    path = tmp_path / "run.yaml"
    for sched, match in (
        ([[5, 64]], "must start at step 0"),
        ([[0, 64], [0, 128]], "must increase"),
        ([[0, 4]], r"seq_len_schedule\[0\]: seq_len 4 is below 8"),
        ([[0, 64, 1]], r"seq_len_schedule\[0\]: expected \[first_step, seq_len\]"),
        ([[0, 256]], "must be at most data.seq_len=128"),
        ([[0, "x"]], r"run.yaml: data.seq_len_schedule\[0\]\[1\]: expected an integer"),
    ):
        path.write_text(yaml.safe_dump({"data": {"seq_len_schedule": sched}}))
        with pytest.raises(ConfigError, match=match):
            load_run_config(path)


def test_resume_across_the_switch_is_exact_with_a_mixture(kjv_dataset, words_dataset, tmp_path):
    """8 steps, blocks of 32 for steps 1-4 and 64 after, on a 0.75/0.25 mixture; a copy of the run
    resumed from step 2's checkpoint replays steps 3-8 bit for bit (fp32)."""
    train = dict(max_steps=8, save_every=2, keep_last=4, warmup_steps=2, peak_flops=1e12)
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "ref", **train)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"] |= {
        "dataset": {str(kjv_dataset): 0.75, str(words_dataset): 0.25},
        "seq_len_schedule": [[0, 32], [4, 64]],
    }
    cfg.write_text(yaml.safe_dump(raw))
    ds = write_ds(tmp_path / "ds.json")
    res = launch("python", 1, cfg, ds)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = tmp_path / "ref"
    rows = {r["step"]: r for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    assert [rows[s]["samples"] for s in range(1, 9)] == [8 * s for s in range(1, 9)]  # samples/step fixed
    assert rows[4]["tokens"] == 4 * 8 * 32 and rows[8]["tokens"] == 4 * 8 * 32 + 4 * 8 * 64
    m = ModelConfig(**yaml.safe_load((ref / "run_config.yaml").read_text())["model"])
    for step, L in ((4, 32), (5, 64)):  # MFU counts each step's FLOPs at its own length
        assert rows[step]["mfu"] * 1e12 / rows[step]["tokens_per_s"] == pytest.approx(flops_per_token(m, L))
    assert rows[2]["lr"] == pytest.approx(2e-3) and rows[8]["lr"] < rows[5]["lr"]  # by optimizer step

    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    for step in (4, 6, 8):
        shutil.rmtree(copy / "checkpoints" / f"step_{step:08d}")
    (copy / "checkpoints" / "latest").write_text("step_00000002\n")
    raw["train"]["run_dir"] = str(copy)
    cfg.write_text(yaml.safe_dump(raw))
    res = launch("python", 1, cfg, ds)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 2" in res.stderr
    assert losses(copy) == losses(ref)

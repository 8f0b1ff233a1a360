"""Mixing prepared datasets with weights (data/mixture.py): proportions, a pure function of
(seed, position), the same stream for any world size, and datasets that cannot be mixed refused."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from roberta_ds.config import ConfigError, load_run_config
from roberta_ds.data.dataset import DatasetError
from roberta_ds.data.mixture import Catalog, MixtureSlots, check_compatible, open_train
from roberta_ds.data.sampler import BlockOrder, GlobalOrderSampler
from tests.training.conftest import ROOT, env, write_config, write_ds

SIZES = {(0, 64): 500, (1, 64): 130, (2, 64): 37}  # the small ones come round many times
WEIGHTS = [0.7, 0.2, 0.1]


def mixed_order(seed=0, gb=24):
    return BlockOrder(SIZES, [[0, 64]], gb, seed, native_len=64, mix=MixtureSlots(WEIGHTS, seed))


def dataset_of(index):
    """Which dataset a catalog index falls in (views laid out in SIZES' order)."""
    return 0 if index < 500 else 1 if index < 630 else 2


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_proportions_within_one_percent_over_10k_samples():
    order = mixed_order()
    for start in (0, 3_333, 123_457):  # not aligned to the mixing period either
        counts = [0, 0, 0]
        for p in range(start, start + 10_000):
            counts[dataset_of(order(p))] += 1
        for c, w in zip(counts, WEIGHTS):
            assert abs(c / 10_000 - w) < 0.01, (start, counts)


def test_each_dataset_is_walked_in_whole_epochs():
    order = mixed_order()
    picked = [order(p) for p in range(100_000)]
    small = [i - 630 for i in picked if i >= 630]  # dataset 2: 37 blocks, ~10% of positions
    for e in range(len(small) // 37):
        assert sorted(small[e * 37 : (e + 1) * 37]) == list(range(37))


def test_order_is_a_pure_function_of_seed_and_position():
    a, b = mixed_order(seed=5), mixed_order(seed=5)
    positions = [7, 70_001, 3, 45_000, 9_999, 10_000, 7]
    assert [a(p) for p in positions] == [b(p) for p in reversed(positions)][::-1]  # any query order
    assert [a(p) for p in range(200)] != [mixed_order(seed=6)(p) for p in range(200)]
    full = take(GlobalOrderSampler(667, 24, 4, 1, 0, seed=5, order=mixed_order(5)), 90)
    resumed = take(GlobalOrderSampler(667, 24, 4, 1, 0, seed=5, start=24 * 11, order=mixed_order(5)), 24)
    assert resumed == full[66:]  # O(1) resume: the state is the position


def test_same_stream_for_one_rank_with_accumulation_and_two_ranks():
    one = take(GlobalOrderSampler(667, 8, 4, 1, 0, seed=1, order=mixed_order(1, gb=8)), 40)
    r0 = take(GlobalOrderSampler(667, 8, 4, 2, 0, seed=1, order=mixed_order(1, gb=8)), 20)
    r1 = take(GlobalOrderSampler(667, 8, 4, 2, 1, seed=1, order=mixed_order(1, gb=8)), 20)
    assert [mb for pair in zip(r0, r1) for mb in pair] == one


def test_real_datasets_mix_through_one_catalog(kjv_dataset, words_dataset):
    catalog, order = open_train([kjv_dataset, words_dataset], [0.75, 0.25], None, 8, seed=0)
    assert isinstance(catalog, Catalog) and len(catalog) == len(catalog.views[0]) + len(catalog.views[1])
    n0 = len(catalog.views[0])
    from_words = [order(p) >= n0 for p in range(4_000)]
    assert abs(sum(from_words) / 4_000 - 0.25) < 0.01
    block = catalog[order(next(p for p, w in enumerate(from_words) if w))]
    assert block["input_ids"].shape == (64,) and block["input_ids"][0] == 0  # <s> ...


def test_a_mixture_in_yaml_is_typed_and_validated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": {"data/books": 7, "data/web": 3}}}))
    d = load_run_config(path).data
    assert d.folders == [Path("data/books"), Path("data/web")] and d.weights == [0.7, 0.3]
    for bad, match in (
        ({"data/books": -1}, r"run.yaml: data: data.dataset.data/books: weight -1.0 must be > 0"),
        ({"data/books": "lots"}, r"run.yaml: data.dataset.data/books: expected a number"),
        ({"builtin": 1, "data/web": 1}, "'builtin' cannot be mixed"),
        ({}, "empty mixture"),
    ):
        path.write_text(yaml.safe_dump({"data": {"dataset": bad}}))
        with pytest.raises(ConfigError, match=match):
            load_run_config(path)


def test_mismatched_seq_len_refused_naming_both_folders(kjv_dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(kjv_dataset, other)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps({**meta, "seq_len": 128}))
    with pytest.raises(
        DatasetError, match=rf"{kjv_dataset} and {other}, whose block length \(seq_len\) differs"
    ):
        check_compatible([kjv_dataset, other])


def test_mismatched_tokenizers_exit_2_naming_both_folders(kjv_dataset, prepared, tmp_path):
    """tests/data/conftest.py's `prepared` trained its own BPE: train.py refuses before building anything."""
    other, _ = prepared
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["dataset"] = {str(kjv_dataset): 0.5, str(other): 0.5}
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--deepspeed_config"]
    res = subprocess.run(
        cmd + [str(write_ds(tmp_path / "ds.json"))], cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"data.dataset mixes {kjv_dataset} and {other}, whose tokenizer" in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

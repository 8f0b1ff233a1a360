"""Masking variants (data.masking: token | whole_word | span) and the masking-rate schedule: statistics
against each definition, whole words never split, span lengths, K bounding every row, purity per
(seed, position), validation of the keys, and exact resume of a whole-word run across a rate change
(a restored sampler position; train.py end to end under the `slow` marker)."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, models

from roberta_ds.config import ConfigError, DataConfig, load_run_config
from roberta_ds.data.dataset import DatasetError, PackedDataset
from roberta_ds.data.masking import (
    IGNORE_INDEX,
    MaskedBlocks,
    MLMCollator,
    draw_spans,
    max_masked,
    mlm_probability_at,
    span_length_probs,
    word_start_table,
)
from roberta_ds.data.sampler import GlobalOrderSampler
from tests.training.conftest import launch, losses, write_config, write_ds

VARIANTS = ("token", "whole_word", "span")
WHITESPACE = " \t\n\r\x0b\x0c"


def masker(folder, cls=MaskedBlocks, global_batch=None, seed=0, **data):
    return cls.from_config(PackedDataset(folder), folder, DataConfig(**data), seed, global_batch)


def special_ids(ds):
    sp = ds.meta["special_tokens"]
    return torch.tensor([sp["bos"], sp["pad"], sp["eos"], sp["unk"], sp["mask"]])


@pytest.mark.parametrize("masking", VARIANTS)
@pytest.mark.parametrize("p", [0.15, 0.3])
def test_rate_and_80_10_10_split(kjv_dataset, masking, p):
    """Over 1,500 blocks, the chosen share of non-special tokens is p and 80/10/10 holds per token."""
    col = masker(kjv_dataset, masking=masking, mlm_probability=p)
    ds, special = col.dataset, special_ids(col.dataset)
    chosen = candidates = masked = randomised = kept = 0
    for pos in range(1500):
        orig = ds[pos % len(ds)]["input_ids"]
        x, y = col.mask(orig, pos)
        sel = y != IGNORE_INDEX
        assert not torch.isin(orig[sel], special).any()  # specials and padding are never chosen
        assert torch.equal(y[sel], orig[sel]) and torch.equal(x[~sel], orig[~sel])
        candidates += int((~torch.isin(orig, special)).sum())
        chosen += int(sel.sum())
        masked += int((x[sel] == col.mask_id).sum())
        changed = sel & (x != orig) & (x != col.mask_id)
        assert not torch.isin(x[changed], special).any()
        randomised += int(changed.sum())
        kept += int((sel & (x == orig)).sum())
    # whole words are taken only when they fit the budget: the rare unfilled remainder is < 1%
    assert abs(chosen / candidates - p) < 0.01
    # a random replacement can draw the original token (1 in ~500): it then counts as kept
    assert abs(masked / chosen - 0.8) < 0.025
    assert abs(randomised / chosen - 0.1) < 0.02 and abs(kept / chosen - 0.1) < 0.02


def test_word_start_table_marks_space_led_tokens(kjv_dataset, tmp_path):
    tok = Tokenizer.from_file(str(kjv_dataset / "tokenizer" / "tokenizer.json"))
    table = word_start_table(kjv_dataset / "tokenizer", tok.get_vocab_size())
    assert table[tok.token_to_id("Ġthe")] and not table[tok.token_to_id("th")] and table[tok.token_to_id("Ġ")]
    for i in range(tok.get_vocab_size()):  # against the decoded text of every token
        assert bool(table[i]) == (tok.decode([i], skip_special_tokens=False)[:1] in WHITESPACE)
    (tmp_path / "tokenizer.json").write_text(  # a word-level tokenizer has no byte-level space
        Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).to_str()
    )
    with pytest.raises(DatasetError, match="not a byte-level BPE"):
        word_start_table(tmp_path, 2)


def test_whole_words_are_never_split(kjv_dataset):
    """A word (a whitespace-led token and the tokens after it up to the next start, special or block
    boundary; decoded text, independent of the table) is masked entirely or not at all."""
    tok = Tokenizer.from_file(str(kjv_dataset / "tokenizer" / "tokenizer.json"))
    leads = [
        tok.decode([i], skip_special_tokens=False)[:1] in WHITESPACE for i in range(tok.get_vocab_size())
    ]
    col = masker(kjv_dataset, masking="whole_word", mlm_probability=0.3)
    ds, special = col.dataset, special_ids(col.dataset).tolist()
    multi = 0
    for pos in range(600):
        ids = ds[pos % len(ds)]["input_ids"].tolist()
        _, y = col.mask(torch.tensor(ids), pos)
        sel = (y != IGNORE_INDEX).tolist()
        word, words = [], []
        for i, t in enumerate(ids):
            if t in special or leads[t] or (i and ids[i - 1] in special):
                words.append(word)
                word = [] if t in special else [i]
            else:
                word.append(i)
        words.append(word)
        for w in filter(None, words):
            assert len({sel[i] for i in w}) == 1, [tok.id_to_token(ids[i]) for i in w]
            multi += len(w) > 1 and sel[w[0]]
    assert multi > 500  # many masked words span several tokens: the check has teeth


def test_span_lengths_follow_the_truncated_geometric():
    """SpanBERT's lengths: Geometric(0.2) on [1, 10] renormalised (mean 3.8). Spans that start with at
    least span_max of the budget left are never cut, and whether they are drawn depends only on earlier
    lengths, so their lengths are unbiased samples; the spans sum to the budget, disjoint, on free tokens."""
    probs = span_length_probs(0.2, 10)
    assert abs(float((probs * torch.arange(1, 11)).sum()) - 3.8) < 0.01
    S, budget, counts = 512, 77, np.zeros(10)
    free = np.ones(S, dtype=bool)
    free[[0, 200, 201, 511]] = False  # <s>, a document boundary, </s>
    for seed in range(300):
        free_S = free.copy()
        spans = draw_spans(free_S, budget, probs, torch.Generator().manual_seed(seed))
        assert sum(n for _, n in spans) == budget
        covered = np.concatenate([np.arange(s, s + n) for s, n in spans])
        assert len(set(covered.tolist())) == budget and free[covered].all() and not free_S[covered].any()
        before = np.cumsum([0] + [n for _, n in spans])
        for (_, n), used in zip(spans, before):
            if used <= budget - 10:
                counts[n - 1] += 1
    expected = probs.numpy() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.sum() > 4000 and chi2 < 27.9  # 9 degrees of freedom, p = 0.001
    assert abs((counts * np.arange(1, 11)).sum() / counts.sum() - 3.8) < 0.15


def test_schedule_values_at_given_steps(kjv_dataset):
    sched = [[0, 0.3], [20000, 0.15]]
    at = [mlm_probability_at(sched, s, 0.15) for s in (0, 10000, 19999, 20000, 10**6)]
    assert at == pytest.approx([0.3, 0.225, 0.3 - 0.15 * 19999 / 20000, 0.15, 0.15])
    three = [[0, 0.1], [10, 0.5], [20, 0.2]]
    assert [mlm_probability_at(three, s, 0) for s in (5, 10, 15, 25)] == pytest.approx([0.3, 0.5, 0.35, 0.2])
    assert mlm_probability_at(None, 7, 0.15) == 0.15
    # training: the rate of the step consuming the position (position // global batch)
    train = masker(kjv_dataset, global_batch=8, mlm_probability_schedule=[[0, 0.4], [4, 0.2]])
    assert [train.rate_at(p) for p in (0, 7, 8, 31, 32, 10**6)] == pytest.approx(
        [0.4, 0.4, 0.35, 0.25, 0.2, 0.2]
    )
    valid = masker(kjv_dataset, MLMCollator, mlm_probability=0.15, mlm_probability_schedule=[[0, 0.4]])
    assert valid.rate_at(0) == valid.rate_at(10**6) == 0.15  # validation: the fixed data.mlm_probability


@pytest.mark.parametrize("masking", VARIANTS)
def test_k_bounds_every_row_at_every_rate(kjv_dataset, masking):
    """mlm_positions' K (the highest scheduled rate's bound) holds every chosen position of every row,
    through a falling schedule and at rate 1."""
    for sched in ([[0, 0.5], [3, 0.15]], [[0, 1.0]]):
        col = masker(kjv_dataset, MLMCollator, 8, masking=masking, mlm_probability_schedule=sched)
        n = len(col.dataset)
        for step in range(5):
            batch = col([(8 * step + i, (8 * step + i) * 7 % n) for i in range(8)])
            labels, pos = batch["labels"], batch["mlm_positions"]
            assert pos.shape[1] == max_masked(labels.shape[1], sched[0][1])
            for b in range(8):
                chosen = (labels[b] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
                assert len(chosen) <= pos.shape[1] and torch.equal(pos[b, : len(chosen)], chosen)


@pytest.mark.parametrize("masking", VARIANTS)
def test_masks_are_a_pure_function_of_seed_and_position(kjv_dataset, masking):
    kw = dict(global_batch=8, masking=masking, mlm_probability_schedule=[[0, 0.3], [2, 0.15]])
    a, b, c = masker(kjv_dataset, **kw), masker(kjv_dataset, **kw), masker(kjv_dataset, seed=1, **kw)
    block = a.dataset[3]["input_ids"]
    ref = {p: a.mask(block, p) for p in (5, 17, 40)}
    for p in (40, 5, 17):  # another instance, another order of calls
        assert all(torch.equal(u, v) for u, v in zip(b.mask(block, p), ref[p]))
    assert not torch.equal(a.mask(block, 17)[1], a.mask(block, 17 + len(a.dataset))[1])
    assert not torch.equal(a.mask(block, 17)[1], c.mask(block, 17)[1])


def test_restored_sampler_position_serves_the_same_batches(kjv_dataset):
    """Whole words under a rate schedule: batches from a sampler restarted at step 3 equal the
    uninterrupted stream's, across the rate change."""
    col = masker(
        kjv_dataset, MLMCollator, 8, masking="whole_word", mlm_probability_schedule=[[0, 0.3], [4, 0.15]]
    )

    def batches(start, n):
        it = iter(GlobalOrderSampler(len(col.dataset), 8, 4, 1, 0, seed=3, start=start))
        return [col(next(it)) for _ in range(n)]

    full, resumed = batches(0, 12), batches(3 * 8, 6)
    for x, y in zip(full[6:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_masking_keys_are_validated(tmp_path):
    path = tmp_path / "run.yaml"
    key = r"run.yaml: data: data.mlm_probability_schedule"
    for data, match in (
        ({"masking": "words"}, r"run.yaml: data.masking: 'words' is not one of"),
        ({"span_length_p": 0}, r"run.yaml: data: data.span_length_p=0.0 must be in \(0, 1\]"),
        ({"span_max": 0}, r"run.yaml: data: data.span_max=0 must be >= 1"),
        ({"mlm_probability_schedule": [[5, 0.3]]}, key + ": must start at step 0"),
        ({"mlm_probability_schedule": [[0, 0.3], [0, 0.2]]}, key + ": steps .* must increase"),
        ({"mlm_probability_schedule": [[0, 1.5]]}, key + r"\[0\]: rate 1.5 must be in \(0, 1\]"),
        ({"mlm_probability_schedule": [[0.5, 0.3]]}, key + r"\[0\]: step 0.5 must be an integer"),
        ({"mlm_probability_schedule": [[0, 0.3, 1]]}, key + r"\[0\]: expected \[step, rate\]"),
        ({"mlm_probability_schedule": []}, key + ": empty"),
    ):
        path.write_text(yaml.safe_dump({"data": data}))
        with pytest.raises(ConfigError, match=match):
            load_run_config(path)
    path.write_text(
        yaml.safe_dump({"data": {"masking": "span", "mlm_probability_schedule": [[0, 0.3], [9, 0.15]]}})
    )
    d = load_run_config(path).data
    assert d.masking == "span" and d.mlm_probability_schedule == [[0, 0.3], [9, 0.15]]


@pytest.mark.slow  # two training launches: ~110 s on a busy 2-core CPU
def test_whole_word_run_resumes_exactly_across_the_rate_change(kjv_dataset, tmp_path):
    """train.py end to end: 6 steps of whole-word masking at 30% falling to 15% by step 4; a copy
    resumed from step 2's checkpoint replays steps 3-6 bit for bit (fp32)."""
    train = dict(max_steps=6, save_every=2, keep_last=3, warmup_steps=2)
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "ref", **train)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"] |= {"masking": "whole_word", "mlm_probability_schedule": [[0, 0.3], [4, 0.15]]}
    cfg.write_text(yaml.safe_dump(raw))
    ds = write_ds(tmp_path / "ds.json")
    res = launch("python", 1, cfg, ds)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = tmp_path / "ref"
    assert yaml.safe_load((ref / "run_config.yaml").read_text())["data"]["masking"] == "whole_word"

    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    for step in (4, 6):
        shutil.rmtree(copy / "checkpoints" / f"step_{step:08d}")
    (copy / "checkpoints" / "latest").write_text("step_00000002\n")
    raw["train"]["run_dir"] = str(copy)
    cfg.write_text(yaml.safe_dump(raw))
    res = launch("python", 1, cfg, ds)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 2" in res.stderr
    assert losses(copy) == losses(ref) and len(losses(ref)) == 6

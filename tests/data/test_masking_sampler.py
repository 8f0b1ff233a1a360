import pytest
import torch

from roberta_ds.data.dataset import PackedDataset
from roberta_ds.data.masking import IGNORE_INDEX, MLMCollator, max_masked
from roberta_ds.data.sampler import GlobalOrderSampler


def collator(ds, seed=0):
    meta = ds.meta
    sp = meta["special_tokens"]
    return MLMCollator(ds, meta["vocab_size"], sp["mask"], [sp["bos"], sp["pad"], sp["eos"], sp["unk"]], seed)


def test_masking_statistics(prepared):
    out, _ = prepared
    ds = PackedDataset(out)
    col = collator(ds)
    special = torch.tensor([0, 1, 2, 3, ds.meta["special_tokens"]["mask"]])
    chosen = candidates = masked = randomised = kept = 0
    for pos in range(3000):
        orig = ds[pos % len(ds)]["input_ids"]
        x, y = col.mask(orig, pos)
        sel = y != -100
        assert not torch.isin(orig[sel], special).any()  # special/padding tokens are never chosen
        assert torch.equal(y[sel], orig[sel]) and torch.equal(x[~sel], orig[~sel])
        candidates += int((~torch.isin(orig, special)).sum())
        chosen += int(sel.sum())
        masked += int((x[sel] == col.mask_id).sum())
        changed = sel & (x != orig) & (x != col.mask_id)
        randomised += int(changed.sum())
        assert not torch.isin(x[changed], special).any()
        kept += int((sel & (x == orig)).sum())
    assert abs(chosen / candidates - 0.15) < 0.01
    # a random replacement can draw the original token (1 in ~400): it then counts as kept
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(randomised / chosen - 0.1) < 0.02 and abs(kept / chosen - 0.1) < 0.02


def test_masking_is_deterministic_per_position_and_fresh_across_positions(prepared):
    out, _ = prepared
    ds = PackedDataset(out)
    a, b = collator(ds, seed=5), collator(ds, seed=5)
    block = ds[3]["input_ids"]
    assert torch.equal(a.mask(block, 17)[0], b.mask(block, 17)[0])
    assert not torch.equal(a.mask(block, 17)[1], a.mask(block, 17 + len(ds))[1])  # next epoch: new mask
    assert not torch.equal(a.mask(block, 17)[1], collator(ds, seed=6).mask(block, 17)[1])


def test_collator_hands_over_every_masked_position_padded_to_a_fixed_count(prepared):
    out, _ = prepared
    ds = PackedDataset(out)
    col = collator(ds)
    for start in (0, 40):
        batch = col([(start + i, i % len(ds)) for i in range(6)])
        labels, pos = batch["labels"], batch["mlm_positions"]
        S = labels.shape[1]
        assert pos.shape == (6, max_masked(S, 0.15)) and pos.dtype == torch.long
        for b in range(6):
            chosen = (labels[b] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
            assert torch.equal(pos[b, : len(chosen)], chosen)  # every labelled position, in order
            assert (labels[b, pos[b, len(chosen) :]] == IGNORE_INDEX).all()  # then unlabelled padding
            assert len(set(pos[b].tolist())) == pos.shape[1]


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_resume_is_o1_and_equals_uninterrupted_stream():
    full = take(GlobalOrderSampler(100, 8, 4, 1, 0, seed=3), 60)  # crosses several epochs
    resumed = take(GlobalOrderSampler(100, 8, 4, 1, 0, seed=3, start=8 * 13), 60 - 26)
    assert resumed == full[26:]


def test_same_global_order_for_one_and_two_ranks():
    one = take(GlobalOrderSampler(50, 8, 4, 1, 0, seed=1), 30)  # 2 accumulation steps per optimizer step
    r0 = take(GlobalOrderSampler(50, 8, 4, 2, 0, seed=1), 15)
    r1 = take(GlobalOrderSampler(50, 8, 4, 2, 1, seed=1), 15)
    two = [mb for pair in zip(r0, r1) for mb in pair]
    assert two == one
    # and resuming a 2-rank run on 1 rank continues the same sequence
    assert take(GlobalOrderSampler(50, 8, 4, 1, 0, seed=1, start=40), 4) == one[10:14]


def test_epoch_is_a_permutation():
    s = GlobalOrderSampler(40, 8, 8, 1, 0, seed=0)
    idx = [i for mb in take(s, 5) for _, i in mb]
    assert sorted(idx) == list(range(40))


def test_inconsistent_batch_sizes_rejected():
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalOrderSampler(100, 10, 4, 2, 0, seed=0)

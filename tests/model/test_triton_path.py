"""The model on the Triton kernels (Triton's CPU interpreter here, CUDA on a GPU) against the
PyTorch reference path: same loss, same gradients for every parameter."""

import copy

import pytest
import torch

import roberta_ds
from roberta_ds.data.masking import masked_positions
from tests.kernels.conftest import DEVICE


def batch(vocab, B=2, S=40):
    ids = torch.randint(4, vocab, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    ids[1, 25:], mask[1, 25:] = 1, 0
    ids[:, 0] = 0
    labels = torch.where(torch.rand(B, S) < 0.2, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    seg = torch.zeros(B, S, dtype=torch.long)
    seg[0, 20:] = 1
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE), seg.to(DEVICE)


@pytest.mark.parametrize("use_segments", [False, True], ids=["padding", "document-mask"])
def test_triton_path_matches_torch_path(use_segments):
    cfg = roberta_ds.model_preset(
        "tiny", vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0, kernels="torch"
    )
    ref = roberta_ds.RobertaMLM(cfg).to(DEVICE)
    tri = copy.deepcopy(ref)
    tri.set_kernels("triton")
    ids, mask, labels, seg = batch(300)
    seg = seg if use_segments else None
    out_ref = ref(ids, mask, labels, segment_ids=seg)  # rows found with nonzero
    positions = masked_positions(labels, 16)  # the collator's sync-free gather, padded rows included
    out_tri = tri(ids, mask, labels, segment_ids=seg, mlm_positions=positions)
    assert tri.ops.backend == "triton" and ref.ops.backend == "torch"
    assert torch.allclose(out_tri.loss, out_ref.loss, atol=1e-5), (out_tri.loss, out_ref.loss)
    assert out_tri.num_masked.item() == out_ref.num_masked.item() == int((labels != -100).sum())
    assert out_tri.correct.item() == out_ref.correct.item()
    out_ref.loss.backward()
    out_tri.loss.backward()
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        assert torch.allclose(p_tri.grad, p_ref.grad, atol=1e-5, rtol=1e-4), name
    with torch.no_grad():  # and full logits without labels
        assert torch.allclose(tri(ids, mask).logits, ref(ids, mask).logits, atol=1e-4)


def test_triton_path_trains_with_dropout():
    cfg = roberta_ds.model_preset("tiny", vocab_size=300, kernels="triton")
    model = roberta_ds.RobertaMLM(cfg).to(DEVICE).train()
    ids, mask, labels, _ = batch(300)
    a = model(ids, mask, labels).loss
    b = model(ids, mask, labels).loss
    assert torch.isfinite(a) and a.item() != b.item()  # fresh dropout masks each call
    a.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

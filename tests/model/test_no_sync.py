"""A training step's forward and backward never wait for the device (issue 13, item 2).

On CPU: every aten op of the step is recorded and those that synchronise with a CUDA device (a value
read back to the host, or an output whose shape depends on the data) are counted. On a GPU: the same
step on the Triton path under torch.cuda.set_sync_debug_mode("error")."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import roberta_ds
from roberta_ds.data.masking import IGNORE_INDEX, masked_positions, max_masked

aten = torch.ops.aten
# ops that make the host wait on CUDA: a value read back, or an output sized by the data
SYNCING = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )  # boolean-mask indexing runs nonzero inside
        if func in SYNCING or bool_index:
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def mlm_batch(vocab, B=3, S=32, p=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 20:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b in range(B):  # as the collator: at most max_masked(S, p) labelled tokens per row
        n = int(mask[b].sum())
        pick = torch.randperm(n, generator=g)[: max_masked(n, p)]
        labels[b, pick] = ids[b, pick]
    return ids, mask, labels, masked_positions(labels, max_masked(S, p))


def step_syncs(model, ids, mask, labels, positions):
    with SyncCounter() as counter:
        out = model(ids, mask, labels, mlm_positions=positions)
        out.loss.backward()
    return counter.syncs, out


def test_training_step_has_no_device_sync_and_the_same_loss():
    torch.manual_seed(0)
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset("tiny", vocab_size=300, kernels="torch")).train()
    ids, mask, labels, positions = mlm_batch(300)
    syncs, out = step_syncs(model, ids, mask, labels, positions)
    assert syncs == []
    assert out.num_masked.item() == int((labels != IGNORE_INDEX).sum())
    model.eval()  # the reference: nonzero-gathered rows, and the counter does see that sync
    syncs_ref, ref = step_syncs(model, ids, mask, labels, None)
    assert syncs_ref == ["aten.nonzero.default"]
    with torch.no_grad():
        out = model(ids, mask, labels, mlm_positions=positions)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    assert out.num_masked.item() == ref.num_masked.item() and out.correct.item() == ref.correct.item()


@pytest.mark.gpu
def test_triton_training_step_runs_under_sync_debug_mode_error():
    model = roberta_ds.RobertaMLM(roberta_ds.model_preset("tiny", vocab_size=300, kernels="triton"))
    model = model.cuda().train()
    ids, mask, labels, positions = (t.cuda() for t in mlm_batch(300))
    model(ids, mask, labels, mlm_positions=positions).loss.backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(ids, mask, labels, mlm_positions=positions)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)

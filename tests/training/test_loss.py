"""The training loss is fairseq's: the sum over every masked token of the global batch over their
number, not a mean of per-micro-batch means; 1 rank x 2 accumulation steps = 2 ranks x 1."""

import pytest
import torch

from roberta_ds.config import ModelConfig
from roberta_ds.data.masking import IGNORE_INDEX, masked_positions
from roberta_ds.export import consolidated_state_dict
from roberta_ds.model import RobertaMLM
from roberta_ds.training.engine import token_weights
from tests.training.conftest import launch, losses, write_config, write_ds

NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _micro_batch(counts_B: list[int], S: int, V: int) -> dict[str, torch.Tensor]:
    """Random ids; row b has counts_B[b] labelled positions (0 allowed)."""
    ids_BS = torch.randint(4, V, (len(counts_B), S))
    labels_BS = torch.full_like(ids_BS, IGNORE_INDEX)
    for b, n in enumerate(counts_B):
        pos = torch.randperm(S)[:n]
        labels_BS[b, pos] = torch.randint(4, V, (n,))
    k = max(max(counts_B), 1)
    return {"input_ids": ids_BS, "labels": labels_BS, "mlm_positions": masked_positions(labels_BS, k)}


def test_token_weights_give_the_token_weighted_global_mean():
    """2 ranks x 2 accumulation steps whose micro-batches hold 1, 14, 0 and 37 masked tokens:
    DeepSpeed's mean over steps and ranks of w * loss equals the direct sum over all masked tokens / N,
    in value and in every gradient."""
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=34,
        kernels="torch",
        **NO_DROPOUT,
    )
    model = RobertaMLM(cfg).double()
    S, V, world, K = 32, cfg.vocab_size, 2, 2
    counts = {(0, 0): [1, 0], (0, 1): [7, 7], (1, 0): [0, 0], (1, 1): [30, 7]}  # (rank, micro): per row
    micro = {rk: _micro_batch(c, S, V) for rk, c in counts.items()}
    n = {rk: (b["labels"] != IGNORE_INDEX).sum() for rk, b in micro.items()}
    total = sum(n.values())

    model.zero_grad()
    logged = torch.zeros((), dtype=torch.float64)
    for r in range(world):
        w_K = token_weights(torch.stack([n[(r, k)] for k in range(K)]), total, world)
        for k in range(K):
            out = model(**micro[(r, k)])
            assert out.num_masked == n[(r, k)]
            (out.loss * w_K[k] / (K * world)).backward()  # DeepSpeed: / accumulation steps, mean over ranks
            logged += out.loss.detach() * w_K[k]
    scaled = {name: p.grad.clone() for name, p in model.named_parameters()}
    logged /= K * world

    model.zero_grad()
    whole = {key: torch.cat([b[key] for b in micro.values()]) for key in ("input_ids", "labels")}
    logits_BSV = model(whole["input_ids"]).logits
    direct = (
        torch.nn.functional.cross_entropy(
            logits_BSV.reshape(-1, V), whole["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        / total
    )
    direct.backward()
    assert abs(logged.item() - direct.item()) <= 1e-12 * direct.item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(scaled[name], p.grad, rtol=1e-10, atol=1e-14, msg=name)
    mean_of_means = sum(model(**b).loss for b in micro.values()) / (K * world)  # the old rule
    assert abs(mean_of_means.item() - direct.item()) > 1e-3  # the counts differ enough to tell them apart


def test_token_weights_sum_to_the_step_count():
    w = token_weights(torch.tensor([3, 0, 5]), torch.tensor(16), world=2)
    assert w.dtype == torch.float64 and torch.equal(w, torch.tensor([1.125, 0.0, 1.875], dtype=torch.float64))
    assert token_weights(torch.tensor([0, 0]), torch.tensor(0), world=1).eq(0).all()  # no masks: no update


@pytest.mark.multiproc
def test_one_rank_accumulating_equals_two_ranks(kjv_dataset, tmp_path):
    """Global batch 8, micro 4: 1 rank x 2 accumulation steps and 2 ranks x 1 see the same batches
    (the sampler), so without dropout they log the same losses and reach the same weights."""
    ds = write_ds(tmp_path / "ds.json", zero_optimization={"stage": 1})
    runs = {}
    for launcher, nproc in (("python", 1), ("torchrun", 2)):
        run = tmp_path / f"run{nproc}"
        cfg = write_config(
            tmp_path / f"run{nproc}.yaml", kjv_dataset, run, model=NO_DROPOUT, max_steps=4, save_every=4
        )
        res = launch(launcher, nproc, cfg, ds)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
        runs[nproc] = run
    a, b = losses(runs[1]), losses(runs[2])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
    wa, wb = (consolidated_state_dict(r / "checkpoints" / "step_00000004") for r in (runs[1], runs[2]))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)

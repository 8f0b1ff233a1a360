"""The builders the loop starts from: a standard DataLoader (MaskedBlocks + batch_sampler +
collate_fn) serves exactly the batches the collator gives for the sampler's items, with or without
workers, so masks (and exact resume) do not depend on how the data is loaded."""

import itertools

import pytest
import torch

from roberta_ds.config import load_run_config
from roberta_ds.data.sampler import GlobalOrderSampler
from roberta_ds.training.builders import build_data, build_loader
from roberta_ds.training.resolve import Run, dataset_folders, with_datasets
from tests.training.conftest import write_config


@pytest.mark.parametrize("workers", [0, 1])
def test_the_dataloader_serves_the_collators_batches(kjv_dataset, tmp_path, workers):
    path = write_config(tmp_path / "run.yaml", kjv_dataset, tmp_path / "run")
    cfg = load_run_config(path, {"data": {"num_workers": workers, "document_mask": True}})
    folders = dataset_folders(cfg)
    cfg = with_datasets(cfg, folders, global_batch=8)
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    run = Run(cfg, ds, "ds.json", "fp32", 2, tmp_path / "run", tuple(folders), None, 8, 2, 2, 1, False)
    data = build_data(run)
    loader = build_loader(data, run, rank=1, start=40)
    sampler = GlobalOrderSampler(len(data.train), 8, 2, 2, 1, cfg.train.seed, start=40, order=data.order)
    assert next(iter(sampler))[0][0] == 42  # position 40 on, rank 1's micro-batch of 2
    for got, items in zip(itertools.islice(loader, 6), sampler):
        want = data.train.collate([data.train[item] for item in items])
        assert (
            got.keys()
            == want.keys()
            == {"input_ids", "labels", "attention_mask", "mlm_positions", "segment_ids"}
        )
        for key in want:
            assert torch.equal(got[key], want[key]), key

"""What the training loop is built from: the datasets and their DataLoader, and the DeepSpeed engine
(the model under zero.Init for ZeRO-3, optionally from Hugging Face weights; AdamW; the schedule).
Each is a function of the resolved `Run` (resolve.py); engine.py calls them and keeps only the loop."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from pathlib import Path

import torch

from roberta_ds.config import RunConfig
from roberta_ds.data.masking import MaskedBlocks, MLMCollator
from roberta_ds.data.mixture import open_train, open_valid
from roberta_ds.data.sampler import BlockOrder, GlobalOrderSampler
from roberta_ds.model import RobertaMLM, load_hf
from roberta_ds.training.optim import build_optimizer, lr_lambda
from roberta_ds.training.preemption import ignore_stop_signals
from roberta_ds.training.resolve import Run

log = logging.getLogger("roberta_ds.train")


# ---------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Data:
    folder: Path  # the first dataset's
    seq_len: int  # the prepared length; data.seq_len_schedule may serve shorter blocks
    train: MaskedBlocks  # item (global position, catalog index) -> masked block
    order: BlockOrder  # global position -> catalog index
    valid: MLMCollator  # fixed masks (seed + 1) at the fixed data.mlm_probability


def build_data(run: Run) -> Data:
    """The run's datasets (resolve.py checked that they can feed it)."""
    d, seed, folders, global_batch = run.cfg.data, run.cfg.train.seed, list(run.folders), run.global_batch
    folder = folders[0]
    train_set, order = open_train(folders, d.weights, d.seq_len_schedule, global_batch, seed)
    return Data(
        folder=folder,
        seq_len=d.seq_len,
        train=MaskedBlocks.from_config(train_set, folder, d, seed, global_batch),
        order=order,
        valid=MLMCollator.from_config(open_valid(folders), folder, d, seed + 1),
    )


def build_loader(data: Data, run: Run, rank: int, start: int) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from global sample position `start` on, forever."""
    cfg = run.cfg
    sampler = GlobalOrderSampler(
        len(data.train), run.global_batch, run.micro_batch, run.world, rank, cfg.train.seed, start, data.order
    )
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        data.train,
        batch_sampler=sampler,
        collate_fn=data.train.collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),  # so that .to(device, non_blocking=True) overlaps
        worker_init_fn=functools.partial(ignore_stop_signals, (cfg.train.preempt_signal,)),
    )


# ---------------------------------------------------------------------------------------- engine
def build_engine(run: Run):
    """(DeepSpeed engine, LR scheduler): the model with its initial weights, AdamW, the schedule."""
    import deepspeed

    t = run.cfg.train
    ds = copy.deepcopy(run.ds)  # DeepSpeed may fill in its own defaults
    model = build_model(run.cfg, ds, run.zero_stage)
    opt = build_optimizer(model, t, offload=run.offload)
    # The schedule is built on the optimizer DeepSpeed wraps (ZeRO regroups parameters).
    engine, _, _, sched = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config=ds,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(t)),
    )
    return engine, sched


def build_model(cfg: RunConfig, ds_cfg: dict, zero_stage: int) -> RobertaMLM:
    """The model with its initial weights. Under ZeRO-3 parameters are partitioned as each module
    is built (deepspeed.zero.Init), so a large model never sits whole on one rank; initial values
    are then written through GatheredParameters."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    stage3 = zero_stage == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=stage3):
        model = RobertaMLM(cfg.model)
    init_weights(model, cfg.train.init_from_hf, stage3)
    return model


def init_weights(model: RobertaMLM, init_from_hf: str | None, stage3: bool) -> None:
    """Module by module: transformers' initialisation, or the weights of a Hugging Face folder."""
    import deepspeed

    hf_sd = load_hf(init_from_hf).state_dict() if init_from_hf else None
    if hf_sd is None and not stage3:
        return  # RobertaMLM.__init__ already initialised the whole (unpartitioned) model
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=stage3):
            if hf_sd is None:
                model._init_weights(module)
            else:
                for pname, p in module.named_parameters(recurse=False):
                    p.data.copy_(hf_sd[f"{name}.{pname}" if name else pname])
    if hf_sd is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        log.info(f"initialised from Hugging Face weights at {init_from_hf}")

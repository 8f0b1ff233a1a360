"""The training loop on DeepSpeed: build (data, model under zero.Init, AdamW, schedule), fit,
validate, checkpoint, stop on preemption.

Exactness: each optimizer step reseeds torch's RNG from (seed, step, rank), and masks come from
(seed, global sample position), so a resumed run replays the uninterrupted one step for step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from roberta_ds.config import ConfigError, RunConfig
from roberta_ds.data.corpus import builtin_dataset_dir, prepare_builtin
from roberta_ds.data.dataset import DatasetError, read_metadata
from roberta_ds.data.masking import MLMCollator
from roberta_ds.data.mixture import check_compatible, open_train, open_valid
from roberta_ds.data.sampler import GlobalOrderSampler, seq_len_at
from roberta_ds.model import RobertaMLM, load_hf
from roberta_ds.training import checkpoint, ds_config
from roberta_ds.training.distributed import (
    all_agree,
    barrier,
    device,
    expected_local_world_size,
    expected_rank,
    expected_world_size,
    init_distributed,
    rank0_does,
)
from roberta_ds.training.loggers import build_loggers
from roberta_ds.training.metrics import MetricsLog, peak_flops
from roberta_ds.training.optim import build_optimizer, lr_lambda
from roberta_ds.training.preemption import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    PREEMPTED_MARKER,
    StopFlag,
    ignore_stop_signals,
    watch_launcher,
)
from roberta_ds.training.preflight import preflight
from roberta_ds.training.run_dir import check_resume_model, check_run_dir
from roberta_ds.training.run_dir import lock as run_dir_lock

log = logging.getLogger("roberta_ds.train")


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG per (seed, step, rank) through a seed sequence: no two ranks or steps collide
    (a linear mix like seed*a + step*b + rank repeats once rank passes b)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def copy_tokenizer(data_dir: Path, run_dir: Path) -> None:
    """The run folder keeps its own tokenizer, so export needs nothing but the run folder."""
    dst = run_dir / "tokenizer"
    if dst.is_dir():
        return
    tmp = run_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(data_dir / "tokenizer", tmp)
    tmp.rename(dst)


class _Keys(torch.utils.data.Dataset):
    """The sampler yields whole micro-batches of (position, index); the collator does the work."""

    def __getitem__(self, items):
        return items


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: str):
        self.cfg = cfg
        t = cfg.train
        # First: a stop signal that arrives while building is honoured at the first step boundary.
        self.stop = StopFlag(["SIGTERM", t.preempt_signal], t.time_limit_minutes)
        watch_launcher()
        self._lock = None
        try:
            ds_cfg = self._check_inputs(ds_config_path)  # before any process group or model exists
        except BaseException:
            if self._lock is not None:  # in-process callers (tests) may go on to use the folder
                os.close(self._lock)
            raise
        self.rank, self.local_rank, self.world = init_distributed()
        self.device = device()
        self.global_batch = ds_cfg["train_batch_size"]
        self.micro_batch = ds_cfg["train_micro_batch_size_per_gpu"]
        self.accum = ds_cfg["gradient_accumulation_steps"]
        self._build_data()
        model = self._build_engine(ds_cfg)
        self.step, self.samples, self.tokens, self.nonfinite = 0, 0, 0, 0
        if self.resume_from is not None:
            self._resume()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "run_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2))
            copy_tokenizer(self.data_dir, self.run_dir)
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl",
            enabled=self.rank == 0,
            resume_step=self.step,
            loggers=build_loggers(self.run_dir, cfg.to_dict(), self.step) if self.rank == 0 else (),
        )
        self.peak = peak_flops(self.precision, t.peak_flops)
        # by block length: MFU stays right across a data.seq_len_schedule switch
        self.flops_per_token = functools.cache(lambda L: model.flops_per_token(L, cfg.data.mlm_probability))

    def _check_inputs(self, ds_config_path: str) -> dict:
        """Every check of the inputs that needs no process group; returns the engine's ds_config."""
        ds_raw = ds_config.load_ds_config(ds_config_path)
        ds_config.check_for_device(ds_raw, "cuda" if torch.cuda.is_available() else "cpu")
        self.precision = ds_config.precision(ds_raw)
        self.run_dir = Path(self.cfg.train.run_dir)
        world = expected_world_size()
        ds_cfg = ds_config.for_engine(ds_raw, world, self.run_dir)
        if self.cfg.data.dataset != "builtin":  # derives model.vocab_size and data.seq_len
            self._check_datasets(self.cfg.data.folders, ds_cfg["train_batch_size"])
        if expected_rank() == 0:  # held until the process exits; the OS releases it on any death
            self._lock = run_dir_lock(self.run_dir)
        check_run_dir(self.cfg, self.run_dir)
        self.resume_from = checkpoint.resolve(self.cfg.train.resume, self.run_dir)
        seq = self.cfg.data.seq_len
        if self.resume_from is not None and self.cfg.data.dataset != "builtin":
            check_resume_model(self.resume_from, dataclasses.asdict(self.cfg.model))
        self._log(
            preflight(
                self.cfg.model,
                ds_raw | ds_cfg,
                self.precision,
                world,
                expected_local_world_size(),
                seq,
                self.cfg.data.mlm_probability,
            ),
            rank=expected_rank(),
        )
        return ds_cfg

    def _build_data(self) -> None:
        self.data_dir = self._dataset()  # the first dataset's: its tokenizer is the run's
        folders = self.cfg.data.folders if self.cfg.data.dataset != "builtin" else [self.data_dir]
        meta = self._check_datasets(folders, self.global_batch)
        if self.resume_from is not None:
            check_resume_model(self.resume_from, dataclasses.asdict(self.cfg.model))
        self.seq_len = meta["seq_len"]  # the prepared length; data.seq_len_schedule may serve shorter
        sp, d = meta["special_tokens"], self.cfg.data
        self.train_set, self.order = open_train(
            folders, d.weights, d.seq_len_schedule, self.global_batch, self.cfg.train.seed
        )
        self.valid_set = open_valid(folders)

        def collator(dataset, seed):
            return MLMCollator(
                dataset,
                meta["vocab_size"],
                sp["mask"],
                [sp["bos"], sp["pad"], sp["eos"], sp["unk"]],
                seed,
                d.mlm_probability,
                d.mask_replace_prob,
                d.random_replace_prob,
                d.document_mask,
            )

        self.collate = collator(self.train_set, self.cfg.train.seed)
        self.valid_collate = collator(self.valid_set, self.cfg.train.seed + 1)  # fixed masks for validation

    def _build_engine(self, ds_cfg: dict) -> RobertaMLM:
        import deepspeed

        t = self.cfg.train
        torch.manual_seed(t.seed)
        stage3 = ds_config.zero_stage(ds_cfg) == 3
        # ZeRO-3: parameters are partitioned as each module is built, so a large model never sits
        # whole on one rank; initial values are then written through GatheredParameters.
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=stage3):
            model = RobertaMLM(self.cfg.model)
        self._init_weights(model, stage3)
        opt = build_optimizer(model, t, offload=ds_config.offloads_optimizer(ds_cfg))
        saved = checkpoint.saved_world_size(self.resume_from) if self.resume_from else 0
        if saved and saved != self.world:  # ZeRO shards are per rank: go through the universal format
            self.resume_from = checkpoint.to_universal(self.resume_from)
            ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
            self._log(f"resuming a {saved}-rank checkpoint on {self.world} ranks via {self.resume_from}")
        # The schedule is built on the optimizer DeepSpeed wraps (ZeRO regroups parameters).
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config=ds_cfg,
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(t)),
        )
        return model

    def _resume(self) -> None:
        state = checkpoint.load(self.engine, self.resume_from, self.rank)
        self.step, self.samples = state["step"], state["samples"]
        self.tokens, self.nonfinite = state["tokens"], state.get("nonfinite", 0)
        self._log(
            f"resumed from {self.resume_from} at step {self.step} (saved by {state['world_size']} ranks, "
            f"now {self.world})"
        )

    # ----------------------------------------------------------------------------------------
    def _log(self, msg: str, rank: int | None = None) -> None:
        if (self.rank if rank is None else rank) == 0:
            log.info(msg)

    def _check_datasets(self, folders: list[Path], global_batch: int) -> dict:
        """Every dataset read (several in a mixture: one tokenizer, one seq_len); the first's metadata."""
        meta = check_compatible(folders)
        for folder in folders:
            self._check_dataset(folder, global_batch)
        return meta

    def _check_dataset(self, folder: Path, global_batch: int) -> dict:
        """The dataset owns vocab size and block length: derive them (a stated value must agree),
        and check that it can feed this run."""
        meta = read_metadata(folder)
        m, d, t, stated = self.cfg.model, self.cfg.data, self.cfg.train, self.cfg.stated
        if "model.vocab_size" in stated and meta["vocab_size"] != m.vocab_size:
            raise ConfigError(
                f"the tokenizer of {folder} has {meta['vocab_size']} tokens but "
                f"model.vocab_size={m.vocab_size}; set model.vocab_size: {meta['vocab_size']} or leave it out"
            )
        if d.dataset != "builtin" and "data.seq_len" in stated and meta["seq_len"] != d.seq_len:
            raise ConfigError(
                f"{folder} holds blocks of {meta['seq_len']} tokens but data.seq_len={d.seq_len}; "
                "leave data.seq_len out (the dataset sets it) or prepare the data again"
            )
        if meta["seq_len"] > m.max_seq_len:
            raise ConfigError(
                f"{folder} has seq_len={meta['seq_len']}, above the model's {m.max_seq_len} positions"
            )
        longest = max((L for _, L in d.seq_len_schedule or []), default=0)
        if longest > meta["seq_len"]:
            raise ConfigError(
                f"data.seq_len_schedule asks for blocks of {longest} tokens but {folder} holds blocks of "
                f"{meta['seq_len']}; shorter blocks are cut from prepared ones, longer ones need a new "
                "prepare"
            )
        self.cfg.model = dataclasses.replace(m, vocab_size=meta["vocab_size"])
        self.cfg.data = dataclasses.replace(d, seq_len=meta["seq_len"])
        train_blocks = meta["splits"]["train"]["num_blocks"]
        if train_blocks < global_batch:
            raise DatasetError(
                f"{folder}: the train split has {train_blocks} blocks, fewer than one global batch "
                f"(train_batch_size={global_batch}); add data or lower train_batch_size"
            )
        if t.eval_every and meta["splits"].get("valid", {}).get("num_blocks", 0) == 0:
            raise DatasetError(
                f"{folder}: the valid split is empty but train.eval_every={t.eval_every}; prepare with "
                "a smaller --valid-every or set train.eval_every: 0"
            )
        if not (folder / "tokenizer").is_dir():
            raise DatasetError(f"{folder / 'tokenizer'}: tokenizer folder missing; prepare the dataset again")
        return meta

    def _dataset(self) -> Path:
        d = self.cfg.data
        if d.dataset != "builtin":
            return d.folders[0]

        def build():  # one rank prepares (once, cached); every rank learns whether it worked
            return prepare_builtin(
                d.cache_dir, d.tokenizer, d.vocab_size, d.seq_len, progress=self.cfg.train.progress_bar
            )

        rank0_does(build, DatasetError)
        barrier()
        return builtin_dataset_dir(d.cache_dir, d.tokenizer, d.vocab_size, d.seq_len)

    def _init_weights(self, model: RobertaMLM, stage3: bool) -> None:
        import deepspeed

        hf_sd = None
        if self.cfg.train.init_from_hf:
            hf_sd = load_hf(self.cfg.train.init_from_hf).state_dict()
        elif not stage3:
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
                        full = f"{name}.{pname}" if name else pname
                        p.data.copy_(hf_sd[full])
        if hf_sd is not None:
            self._log(f"initialised from Hugging Face weights at {self.cfg.train.init_from_hf}")

    def _loader(self):
        sampler = GlobalOrderSampler(
            len(self.train_set),
            self.global_batch,
            self.micro_batch,
            self.world,
            self.rank,
            self.cfg.train.seed,
            start=self.samples,
            order=self.order,
        )
        return iter(
            torch.utils.data.DataLoader(
                _Keys(),
                sampler=sampler,
                batch_size=None,
                collate_fn=self.collate,
                num_workers=self.cfg.data.num_workers,
                persistent_workers=self.cfg.data.num_workers > 0,
                pin_memory=self.device.type == "cuda",  # so that .to(device, non_blocking=True) overlaps,
                worker_init_fn=functools.partial(ignore_stop_signals, (self.cfg.train.preempt_signal,)),
            )
        )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _state(self) -> dict:
        return {
            "step": self.step,
            "samples": self.samples,
            "tokens": self.tokens,
            "nonfinite": self.nonfinite,
            "world_size": self.world,
            "config": self.cfg.to_dict(),
        }

    def save(self, tag: str | None = None, make_latest: bool = True) -> Path:
        path = checkpoint.save(
            self.engine,
            self.run_dir,
            self.step,
            self._state(),
            self.cfg.train.keep_last,
            self.rank,
            tag=tag,
            make_latest=make_latest,
        )
        self._log(f"checkpoint {path} complete")
        return path

    # ----------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps; returns the process exit code (0, EXIT_PREEMPTED, EXIT_NONFINITE)."""
        t, stop = self.cfg.train, self.stop
        if self.step >= t.max_steps:  # a finished run run again: nothing to train, nothing rewritten
            self._log(f"the run is complete at step {self.step} (train.max_steps={t.max_steps})")
            return 0
        batches = self._loader()
        self.engine.train()
        from tqdm import tqdm

        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=self.rank != 0 or not t.progress_bar,
            desc="train",
            dynamic_ncols=True,
        )
        self._log(
            f"training: world {self.world}, global batch {self.global_batch} = micro {self.micro_batch} x "
            f"accumulation {self.accum} x {self.world} ranks, "
            f"seq {self.cfg.data.seq_len_schedule or self.seq_len}, {self.precision}, "
            f"kernels {self.engine.module.ops.backend}"
        )
        t_last, tokens_last, flops_last = time.perf_counter(), 0, 0.0
        while self.step < t.max_steps:
            if all_agree(stop.requested()):
                self._log(f"stopping at step {self.step}: {stop.reason or 'another rank was asked to'}")
                self.save()
                if self.rank == 0:  # read by slurm/common.sh: requeue even if srun reports a kill
                    (self.run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": self.step}) + "\n")
                self.metrics.close()
                return EXIT_PREEMPTED
            torch.manual_seed(dropout_seed(t.seed, self.step, self.rank))
            lr = self.sched.get_last_lr()[0]  # this step's; the scheduler moves on inside engine.step()
            seq = seq_len_at(self.cfg.data.seq_len_schedule, self.step, self.seq_len)  # the sampler's too
            loss_sum = torch.zeros((), device=self.device)
            for _ in range(self.accum):
                out = self.engine(**self._to_device(next(batches)))
                self.engine.backward(out.loss)
                self.engine.step()
                loss_sum += out.loss.detach().float()
            torch.distributed.all_reduce(loss_sum)
            loss = loss_sum.item() / (self.accum * self.world)
            self.step += 1
            self.samples += self.global_batch
            self.tokens += self.global_batch * seq
            tokens_last += self.global_batch * seq
            flops_last += self.global_batch * seq * self.flops_per_token(seq)
            self.nonfinite = 0 if math.isfinite(loss) else self.nonfinite + 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps or self.nonfinite:
                dt = time.perf_counter() - t_last
                self._log_step(loss, lr, tokens_last / dt, flops_last / dt, bar)
                t_last, tokens_last, flops_last = time.perf_counter(), 0, 0.0
            if self.nonfinite >= t.max_nonfinite_steps:
                # Saved aside for inspection: `latest` stays on the last good checkpoint and nothing
                # is pruned, since the updates may not have been skipped (bf16 is not overflow-checked).
                aside = self.save(tag=f"nonfinite_{checkpoint.tag_for(self.step)}", make_latest=False)
                self._log(
                    f"stopping: {self.nonfinite} consecutive non-finite losses at step {self.step}; "
                    f"weights saved aside in {aside}, latest unchanged"
                )
                return EXIT_NONFINITE
            if t.eval_every and self.step % t.eval_every == 0:
                self.evaluate()
            # never a periodic checkpoint (nor `latest`) on a non-finite loss
            if (
                t.save_every
                and self.step % t.save_every == 0
                and self.step < t.max_steps
                and not self.nonfinite
            ):
                self.save()
        bar.close()
        if t.eval_every and self.step % t.eval_every:  # else it just ran inside the loop
            self.evaluate()
        self.save()
        self.metrics.close()
        return 0

    def _log_step(self, loss: float, lr: float, tokens_per_s: float, flops_per_s: float, bar) -> None:
        gn = self.engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else None
        achieved = flops_per_s / self.world  # model FLOP/s per device
        row = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": gn,
            "tokens_per_s": tokens_per_s,
            "mfu": achieved / self.peak if self.peak else None,
            "tokens": self.tokens,
            "samples": self.samples,
            "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
        }
        self.metrics.write(row)
        if self.rank == 0:
            self.engine.monitor.write_events(
                [
                    ("Train/loss", loss, self.step),
                    ("Train/lr", row["lr"], self.step),
                    ("Train/tokens_per_s", tokens_per_s, self.step),
                ]
            )
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """MLM loss, perplexity and masked-token accuracy on the held-out split (fixed masks)."""
        self.engine.eval()
        n = len(self.valid_set)
        per_rank = self.micro_batch
        n_batches = min(self.cfg.train.eval_batches, max(1, math.ceil(n / (per_rank * self.world))))
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss x masked, masked, correct
        for b in range(n_batches):
            base = (b * self.world + self.rank) * per_rank
            items = [(q, q % n) for q in range(base, base + per_rank)]  # wraps: every rank runs equal batches
            out = self.engine(**self._to_device(self.valid_collate(items)))
            m = out.num_masked.double()
            sums += torch.stack([out.loss.double() * m, m, out.correct.double()])
        torch.distributed.all_reduce(sums)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        res = {
            "step": self.step,
            "valid_loss": loss,
            "valid_ppl": math.exp(min(loss, 50)),
            "valid_accuracy": (sums[2] / sums[1].clamp(min=1)).item(),
        }
        self.metrics.write(res)
        self.metrics.plot()
        self._log(
            f"validation at step {self.step}: loss {loss:.4f}, ppl {res['valid_ppl']:.2f}, "
            f"accuracy {res['valid_accuracy']:.4f}"
        )
        self.engine.train()
        return res

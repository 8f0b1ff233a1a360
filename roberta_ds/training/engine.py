"""The training loop on DeepSpeed, over a run resolved by training/resolve.py and built by
training/builders.py: fit, validate, checkpoint (training/checkpoint.py's Checkpointer), stop.

The loss is fairseq's RoBERTa loss: the sum over every masked token of the global batch over their
number (token_weights), whatever the split into ranks and accumulation steps.

Exactness: each optimizer step reseeds torch's RNG from (seed, step, rank), and masks come from
(seed, global sample position), so a resumed run replays the uninterrupted one step for step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from roberta_ds.data.masking import IGNORE_INDEX, mlm_probability_at
from roberta_ds.data.sampler import seq_len_at
from roberta_ds.errors import RendezvousError
from roberta_ds.model.roberta import flops_per_token
from roberta_ds.training import exit_status
from roberta_ds.training.builders import build_data, build_engine, build_loader
from roberta_ds.training.checkpoint import Checkpointer, tag_for
from roberta_ds.training.distributed import all_agree, device, init_distributed
from roberta_ds.training.loggers import build_loggers
from roberta_ds.training.metrics import MetricsLog, peak_flops
from roberta_ds.training.op_builds import ensure_built, needed_ops
from roberta_ds.training.preemption import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    PREEMPTED_MARKER,
    StopFlag,
    stopped_message,
    watch_launcher,
)
from roberta_ds.training.resolve import Run, write_run_folder
from roberta_ds.training.watchdog import Watchdog

log = logging.getLogger("roberta_ds.train")


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout RNG per (seed, step, rank) through a seed sequence: no two ranks or steps collide
    (a linear mix like seed*a + step*b + rank repeats once rank passes b)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def token_weights(num_masked_K: torch.Tensor, total_masked: torch.Tensor, world: int) -> torch.Tensor:
    """(K,) fp64 weights w_k = n_k * K * world / N for the K micro-batches of one rank's step, where
    n_k is micro-batch k's masked-token count and N the global batch's (all ranks, all K).

    DeepSpeed averages the backward losses over the K accumulation steps and the world's ranks, so
    backpropagating w_k * mean_k makes the update that of sum_{k,r} n_kr * mean_kr / N: fairseq's
    RoBERTa loss, the sum over every masked token of the global batch over their number, instead of
    a mean of per-micro-batch means (which overweights the tokens of sparsely masked micro-batches).
    """
    scale = len(num_masked_K) * world / total_masked.double().clamp(min=1)
    return num_masked_K.double() * scale


class Trainer:
    """The loop over a resolved run (resolve.py): builds it (builders.py), trains, validates, and
    saves through its Checkpointer. Its state (step, samples, tokens) is public."""

    def __init__(self, run: Run, stop: StopFlag | None = None):
        self.run, self.cfg = run, run.cfg
        t = run.cfg.train
        if stop is None:  # train.py arms its flag before anything is read; in-process callers get one
            stop = StopFlag(["SIGTERM", "SIGINT"], None, run.run_dir)
            stop.arm([t.preempt_signal], t.time_limit_minutes)
            watch_launcher()
        self.stop, self.run_dir, self.precision = stop, run.run_dir, run.precision
        self.global_batch, self.micro_batch, self.accum = run.global_batch, run.micro_batch, run.accum
        # Before init_distributed, which loads the shm collectives: a build killed earlier left a
        # lock that torch would wait on forever; ensure_built clears it (training/op_builds.py).
        ensure_built(needed_ops(offload=run.offload))
        self.rank, self.local_rank, self.world = init_distributed()
        if self.world != run.world:  # the batch arithmetic and the resume plan used run.world
            raise RendezvousError(
                f"the process group has {self.world} ranks but the launcher's environment said "
                f"{run.world} (WORLD_SIZE / OMPI_COMM_WORLD_SIZE / PMI_SIZE / SLURM_NTASKS); "
                "set WORLD_SIZE to the real number of ranks"
            )
        self.device = device()
        # From here on a stalled rank is named by the others (train.stall_timeout_s covers the
        # build below, the first step's compilation, evaluations and saves).
        self.watchdog = Watchdog(self.rank, self.world, t.stall_timeout_s, self.run_dir)
        self.watchdog.start()
        self.checkpoints = Checkpointer(self.run_dir, t.save_every, t.keep_last, self.rank, self.world)
        resume = self.checkpoints.loadable(run.resume) if run.resume is not None else None
        self.data = build_data(run)
        self.engine, self.sched = build_engine(run)
        self.step, self.samples, self.tokens, self.nonfinite = 0, 0, 0, 0
        if resume is not None:
            state = self.checkpoints.load(self.engine, resume)
            self.step, self.samples = state["step"], state["samples"]
            self.tokens, self.nonfinite = state["tokens"], state.get("nonfinite", 0)
            self.watchdog.step = self.step
            self._log(
                f"resumed from {run.resume} at step {self.step} (saved by {state['world_size']} "
                f"ranks, now {self.world})"
            )
        if self.rank == 0:
            write_run_folder(run)
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl",
            enabled=self.rank == 0,
            resume_step=self.step,
            loggers=build_loggers(self.run_dir, self.cfg.to_dict(), self.step) if self.rank == 0 else (),
        )
        self.peak = peak_flops(self.precision, t.peak_flops)

    # ----------------------------------------------------------------------------------------
    def _log(self, msg: str, rank: int | None = None) -> None:
        if (self.rank if rank is None else rank) == 0:
            log.info(msg)

    def _train_step(self, micro: list[dict]) -> float:
        """One optimizer step over this rank's micro-batches (on the host); returns the loss, the
        token-weighted mean over the global batch's masked tokens (fairseq's)."""
        w_K = self._loss_weights(micro)
        loss_sum = torch.zeros((), device=self.device)
        for batch, w in zip(micro, w_K):
            out = self.engine(**self._to_device(batch))
            self.engine.backward(out.loss * w)
            self.engine.step()
            loss_sum += out.loss.detach().float() * w
        torch.distributed.all_reduce(loss_sum)
        return loss_sum.item() / (self.accum * self.world)

    def _loss_weights(self, micro: list[dict]) -> torch.Tensor:
        """(K,) fp32 on the device: each micro-batch's loss weight for token_weights (one all-reduce
        of the step's masked-token count; the counts come from the host's labels, no device sync)."""
        counts_K = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro])
        counts_K = counts_K.to(self.device, non_blocking=True)
        total = counts_K.sum()
        torch.distributed.all_reduce(total)
        return token_weights(counts_K, total, self.world).float()  # the loss's precision (fp32)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _state(self) -> dict:
        return {
            "step": self.step,
            "samples": self.samples,
            "tokens": self.tokens,
            "nonfinite": self.nonfinite,
            "world_size": self.world,
            "precision": self.precision,
            "config": self.cfg.to_dict(),
        }

    def save(self, tag: str | None = None, make_latest: bool = True) -> Path:
        path = self.checkpoints.save(self.engine, self.step, self._state(), tag, make_latest)
        self._log(f"checkpoint {path} complete")
        return path

    # ----------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps; returns the process exit code (0, EXIT_PREEMPTED, EXIT_NONFINITE)."""
        t, stop = self.cfg.train, self.stop
        if self.step >= t.max_steps:  # a finished run run again: nothing to train, nothing rewritten
            self._log(f"the run is complete at step {self.step} (train.max_steps={t.max_steps})")
            return 0
        batches = iter(build_loader(self.data, self.run, self.rank, self.samples))
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
            f"seq {self.cfg.data.seq_len_schedule or self.data.seq_len}, {self.precision}, "
            f"kernels {self.engine.module.ops.backend}"
        )
        t_last, tokens_last, flops_last = time.perf_counter(), 0, 0.0
        while self.step < t.max_steps:
            if all_agree(stop.requested()):
                return self._stop()
            torch.manual_seed(dropout_seed(t.seed, self.step, self.rank))
            lr = self.sched.get_last_lr()[0]  # this step's; the scheduler moves on inside engine.step()
            seq = seq_len_at(self.cfg.data.seq_len_schedule, self.step, self.data.seq_len)  # the sampler's
            d = self.cfg.data  # and the masker's rate
            rate = mlm_probability_at(d.mlm_probability_schedule, self.step, d.mlm_probability)
            loss = self._train_step([next(batches) for _ in range(self.accum)])
            self.step += 1
            self.watchdog.stepped(self.step)
            self.samples += self.global_batch
            self.tokens += self.global_batch * seq
            tokens_last += self.global_batch * seq
            # at this step's block length and masking rate (the head runs on the masked rows only), so
            # MFU stays right across data.seq_len_schedule and data.mlm_probability_schedule
            flops_last += self.global_batch * seq * flops_per_token(self.cfg.model, seq, rate)
            self.nonfinite = 0 if math.isfinite(loss) else self.nonfinite + 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.max_steps or self.nonfinite:
                dt = time.perf_counter() - t_last
                self._log_step(loss, lr, tokens_last / dt, flops_last / dt, bar)
                t_last, tokens_last, flops_last = time.perf_counter(), 0, 0.0
            if self.nonfinite >= t.max_nonfinite_steps:
                return self._stop_nonfinite()
            if t.eval_every and self.step % t.eval_every == 0:
                self.evaluate()
            if self.checkpoints.due(self.step, t.max_steps, self.nonfinite):
                self.save()
        bar.close()
        if t.eval_every and self.step % t.eval_every:  # else it just ran inside the loop
            self.evaluate()
        self.save()
        self.metrics.close()
        return 0

    def _stop(self) -> int:
        """A stop asked for (a signal, the time limit, a launcher gone) that every rank agreed on:
        checkpoint, PREEMPTED, the verdict; returns EXIT_PREEMPTED."""
        self._log(f"stopping at step {self.step}: {self.stop.reason or 'another rank was asked to'}")
        self.save()
        if self.rank == 0:  # read by slurm/common.sh: requeue even if srun reports a kill
            (self.run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": self.step}) + "\n")
        # The verdict now, before the loggers close (W&B's can take seconds): a launcher may kill
        # the ranks soon after its signal (mpirun: 1 s, odls_base_sigkill_timeout).
        exit_status.record(EXIT_PREEMPTED, stopped_message(self.step), self.run_dir)
        self.metrics.close()
        return EXIT_PREEMPTED

    def _stop_nonfinite(self) -> int:
        """Too many non-finite losses in a row: the weights are saved aside for inspection; `latest`
        stays on the last good checkpoint and nothing is pruned, since the updates may not have been
        skipped (bf16 is not overflow-checked). Returns EXIT_NONFINITE."""
        aside = self.save(tag=f"nonfinite_{tag_for(self.step)}", make_latest=False)
        self._log(
            f"stopping: {self.nonfinite} consecutive non-finite losses at step {self.step}; "
            f"weights saved aside in {aside}, latest unchanged"
        )
        self.metrics.close()  # the last rows reach TensorBoard/W&B and the plot
        return EXIT_NONFINITE

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
        n = len(self.data.valid)
        per_rank = self.micro_batch
        n_batches = min(self.cfg.train.eval_batches, max(1, math.ceil(n / (per_rank * self.world))))
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss x masked, masked, correct
        for b in range(n_batches):
            base = (b * self.world + self.rank) * per_rank
            items = [(q, q % n) for q in range(base, base + per_rank)]  # wraps: every rank runs equal batches
            out = self.engine(**self._to_device(self.data.valid(items)))
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

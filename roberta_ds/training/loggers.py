"""Where metrics.jsonl rows also go: TensorBoard (always, every device), Weights & Biases (when the
package is installed; offline, no network), and a PNG of the curves drawn from metrics.jsonl.

Only rank 0 logs. Rows keep metrics.jsonl's keys; a train row becomes `train/<key>` scalars and a
validation row (`valid_*` keys) `valid/<key>` scalars, both at the row's `step`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

PLOT_NAME = "metrics.png"
TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = {"step"}


def scalars(row: dict) -> dict[str, float]:
    """`train/loss`, `valid/valid_accuracy`, ... for every finite number in a metrics row."""
    split = "valid" if any(k.startswith("valid_") for k in row) else "train"
    return {
        f"{split}/{k}": float(v)
        for k, v in row.items()
        if k not in _NOT_SCALARS
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class TensorBoardLogger:
    """Event files in <run_dir>/tensorboard/. On resume, `purge_step` hides the events logged past
    the checkpoint (as metrics.jsonl drops those rows), so every step appears once."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run in <run_dir>/wandb, offline unless WANDB_MODE says otherwise
    (`wandb sync <run_dir>/wandb/offline-run-*` uploads it later). W&B cannot resume an offline
    run, so each session of a run folder is its own W&B run, named by the step it starts from and
    grouped by the folder's name; steps are optimizer steps, as in metrics.jsonl."""

    def __init__(self, wandb, run_dir: Path, config: dict, resume_step: int = 0):
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "roberta-ds"),
            group=run_dir.name,
            name=f"{run_dir.name}-from-step-{resume_step}",
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            # the console stays ours (progress bar, launcher logs): no stdout wrapping
            settings=wandb.Settings(console="off"),
        )

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def build_loggers(run_dir: Path, config: dict, resume_step: int = 0) -> list:
    """TensorBoard always; W&B when `wandb` imports and WANDB_MODE is not `disabled` (skipped with
    a log line otherwise)."""
    loggers: list = [TensorBoardLogger(run_dir, resume_step)]
    if os.environ.get("WANDB_MODE") == "disabled":
        log.info("WANDB_MODE=disabled: logging to metrics.jsonl and TensorBoard only")
        return loggers
    try:
        import wandb
    except ImportError:
        log.info("wandb is not installed: logging to metrics.jsonl and TensorBoard only")
    else:
        try:
            loggers.append(WandbLogger(wandb, run_dir, config, resume_step))
        except Exception as e:  # a broken wandb set-up must not stop training
            log.warning("wandb disabled: %s", e)
    return loggers


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill mid-write
    return rows


def plot_metrics(metrics_path: Path, out: Path | None = None) -> Path:
    """A 2x2 PNG (loss with validation loss, masked accuracy, lr, tokens/s) from metrics.jsonl;
    written to a temp file and renamed, so a reader never sees half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    out = Path(out) if out else metrics_path.with_name(PLOT_NAME)
    rows = read_rows(metrics_path)
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_loss" in r]

    def series(rs, key):
        pts = [(r["step"], r[key]) for r in rs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    ax = axes[0, 0]
    ax.plot(*series(train, "loss"), label="train", lw=1)
    ax.plot(*series(valid, "valid_loss"), "o-", label="valid")
    ax.set(title="MLM loss", xlabel="step")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(*series(valid, "valid_accuracy"), "o-", color="C1")
    ax.set(title="held-out masked accuracy", xlabel="step", ylim=(0, None))
    axes[1, 0].plot(*series(train, "lr"), color="C2")
    axes[1, 0].set(title="learning rate", xlabel="step")
    axes[1, 1].plot(*series(train, "tokens_per_s"), color="C3", lw=1)
    axes[1, 1].set(title="tokens/s (all ranks)", xlabel="step", ylim=(0, None))
    fig.suptitle(str(metrics_path.parent))
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out

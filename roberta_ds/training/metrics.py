"""Throughput and MFU, and the run's metrics.jsonl (one JSON object per optimizer step), which
also feeds the loggers (TensorBoard, W&B) and the PNG plot of training/loggers.py."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import torch

# Dense (no sparsity) peak FLOP/s by precision; MFU = achieved model FLOP/s / this.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
}


def peak_flops(precision: str, override: float | None = None) -> float | None:
    """Per-device peak for MFU: the override, else the table entry matching the GPU's name, else
    None (CPUs and unknown GPUs report no MFU unless train.peak_flops is set)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # most specific name first
        if all(part in name for part in key.split()):
            return PEAK_FLOPS[key][precision]
    return None


# W&B's finish() waits on its service; one killed with the job would otherwise hold the exit.
LOGGER_CLOSE_TIMEOUT_S = 30.0


class MetricsLog:
    """Appends rows; on opening, drops the rows past `resume_step` (logged after the checkpoint
    that the run resumes from, and logged again now), so that every step appears once. Each row
    also goes to `loggers` (objects with log/flush/close, see training/loggers.py)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0, loggers: tuple = ()):
        self.path, self.enabled = path, enabled
        self.loggers = list(loggers) if enabled else []
        self._f = None
        if not enabled:
            return
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill mid-write
                if row.get("step", 0) <= resume_step:
                    keep.append(line + "\n")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(keep))
            tmp.replace(path)
        self._f = path.open("a")

    def write(self, row: dict) -> None:
        if self._f:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        for lg in list(self.loggers):
            self._best_effort(lg, "log", row)

    def _best_effort(self, lg, method: str, *args, timeout_s: float | None = None) -> None:
        """A logger never decides whether work is saved: its failure (a service killed by the
        job's signal, a full disk, a broken pipe) is one warning and the logger is dropped, and a
        close that does not return in `timeout_s` is left behind (a daemon thread) instead of
        hanging the run's exit."""
        name = type(lg).__name__
        try:
            if timeout_s is None:
                getattr(lg, method)(*args)
                return
            err: list[BaseException] = []

            def call():
                try:
                    getattr(lg, method)(*args)
                except BaseException as e:  # noqa: BLE001 - reported below
                    err.append(e)

            t = threading.Thread(target=call, name=f"{name}.{method}", daemon=True)
            t.start()
            t.join(timeout_s)
            if t.is_alive():
                raise TimeoutError(f"{method}() did not return in {timeout_s:.0f} s")
            if err:
                raise err[0]
        except Exception as e:
            logging.getLogger(__name__).warning(
                "%s dropped: %s failed (%s: %s); metrics.jsonl keeps every row",
                name,
                method,
                type(e).__name__,
                e,
            )
            if lg in self.loggers:
                self.loggers.remove(lg)

    def plot(self) -> None:
        """Redraw <run_dir>/metrics.png and flush the loggers (at each evaluation and at the end);
        a plotting failure is logged, never fatal to training."""
        if not self._f:
            return
        for lg in list(self.loggers):
            self._best_effort(lg, "flush")
        from roberta_ds.training.loggers import plot_metrics

        try:
            plot_metrics(self.path)
        except Exception as e:
            logging.getLogger(__name__).warning("could not draw %s: %s", self.path.with_suffix(".png"), e)

    def close(self) -> None:
        """Final plot, then close the loggers; safe to call twice."""
        self.plot()
        for lg in list(self.loggers):
            self._best_effort(lg, "close", timeout_s=LOGGER_CLOSE_TIMEOUT_S)
        self.loggers = []
        if self._f:
            self._f.close()
            self._f = None

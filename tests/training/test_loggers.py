"""metrics.jsonl rows reach TensorBoard (train/ and valid/ scalars, readable by tensorboard's
EventAccumulator) and an offline Weights & Biases run (read back from its .wandb file), the PNG is
drawn, and a resumed run's TensorBoard hides the replayed steps."""

import json

import pytest

from roberta_ds.training.loggers import PLOT_NAME, TENSORBOARD_DIR, build_loggers, scalars
from roberta_ds.training.metrics import MetricsLog
from tests.training.wandb_records import wandb_history


def _train_row(step):
    return {
        "step": step,
        "loss": 8.0 - 0.1 * step,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 1000.0 + step,
        "mfu": None,
        "tokens": 128 * step,
        "samples": step,
        "skipped_steps": 0,
    }


def _valid_row(step):
    return {"step": step, "valid_loss": 7.0, "valid_ppl": 1096.6, "valid_accuracy": 0.01 * step}


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _log(run_dir, steps, resume_step=0):
    log = MetricsLog(
        run_dir / "metrics.jsonl",
        enabled=True,
        resume_step=resume_step,
        loggers=build_loggers(run_dir, {"train": {"lr": 1e-3}}, resume_step),
    )
    for step in steps:
        log.write(_train_row(step))
        if step % 5 == 0:
            log.write(_valid_row(step))
            log.plot()
    log.close()


def test_scalars_split_train_and_valid_rows():
    assert scalars(_valid_row(5)) == {
        "valid/valid_loss": 7.0,
        "valid/valid_ppl": 1096.6,
        "valid/valid_accuracy": 0.05,
    }
    s = scalars(_train_row(3))
    assert "train/mfu" not in s and "train/step" not in s  # None and the x axis are not scalars
    assert s["train/loss"] == 8.0 - 0.3


def test_tensorboard_events_and_png_hold_the_metrics(tmp_path):
    _log(tmp_path, range(1, 11))
    ev = _events(tmp_path)
    assert [s for s, _ in ev["train/loss"]] == list(range(1, 11))
    assert abs(ev["train/loss"][-1][1] - 7.0) < 1e-6
    assert [s for s, _ in ev["valid/valid_accuracy"]] == [5, 10]
    for tag in ("train/lr", "train/tokens_per_s", "train/grad_norm", "valid/valid_loss"):
        assert tag in ev
    png = tmp_path / PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) == set(_train_row(1))  # metrics.jsonl keys unchanged


def test_resume_hides_replayed_steps_in_tensorboard(tmp_path):
    _log(tmp_path, range(1, 11))
    _log(tmp_path, range(6, 13), resume_step=5)  # killed after step 10, resumed from step 5's checkpoint
    steps = [s for s, _ in _events(tmp_path)["train/loss"]]
    assert steps == list(range(1, 13))


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    """With wandb installed and WANDB_MODE unset, the run logs offline into <run_dir>/wandb (no
    network), keyed by optimizer step; a resumed session is a second run of the same group."""
    pytest.importorskip("wandb")  # a test extra: installed by scripts/test.sh
    monkeypatch.delenv("WANDB_MODE")  # tests/conftest.py disables W&B for the other tests
    _log(tmp_path, range(1, 11))
    _log(tmp_path, range(6, 13), resume_step=5)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    history = wandb_history(tmp_path)
    assert sorted(history) == list(range(1, 13))
    assert abs(history[3]["train/loss"] - (8.0 - 0.3)) < 1e-9
    assert history[10]["valid/valid_accuracy"] == 0.1 and history[10]["train/tokens_per_s"] == 1010.0
    assert "train/mfu" not in history[1]  # None is not a scalar


class _Recorder:
    def __init__(self):
        self.rows = []

    def log(self, row):
        self.rows.append(row["step"])

    def flush(self):
        pass

    def close(self):
        self.rows.append("closed")


class _LostService(_Recorder):
    """What W&B does once the job's SIGTERM has killed its service."""

    def log(self, row):
        if row["step"] >= 3:
            raise ConnectionResetError("Connection lost")
        super().log(row)


class _HangingClose(_Recorder):
    def close(self):
        import time

        time.sleep(3600)


def test_a_failing_or_hanging_logger_is_dropped_with_a_warning(tmp_path, monkeypatch, caplog):
    import time

    import roberta_ds.training.metrics as metrics

    monkeypatch.setattr(metrics, "LOGGER_CLOSE_TIMEOUT_S", 0.5)
    lost, hanging, good = _LostService(), _HangingClose(), _Recorder()
    m = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, loggers=(lost, hanging, good))
    for step in range(1, 6):
        m.write(_train_row(step))  # raises nothing though W&B's connection is gone
    t0 = time.monotonic()
    m.close()
    assert time.monotonic() - t0 < 5, "a hanging logger held close()"
    assert lost.rows == [1, 2]  # dropped at its first failure, not called again
    assert good.rows == [1, 2, 3, 4, 5, "closed"]
    assert hanging.rows == [1, 2, 3, 4, 5]
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5]  # metrics.jsonl keeps every row
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("_LostService dropped" in w and "ConnectionResetError" in w for w in warned), warned
    assert any("_HangingClose dropped" in w and "did not return" in w for w in warned), warned
    assert len([w for w in warned if "_LostService" in w]) == 1  # one warning, not one per row

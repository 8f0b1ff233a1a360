"""A rank stopped with SIGSTOP is named by the others, who exit 99 ("stalled") within the stall
timeout plus a bounded margin, instead of waiting in gloo; the latest checkpoint stays intact."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

from roberta_ds.training.checkpoint import tag_for
from tests.training.conftest import launch_cmd, write_ds
from tests.training.launching import Launch, check_resume_replays, stop_config

pytestmark = pytest.mark.multiproc
STALL_S = 10
MARGIN_S = 15  # heartbeat interval (2.5 s) + the store's read time-out + a slow machine


def test_a_stopped_rank_is_named_and_every_live_rank_exits_99(kjv_dataset, tmp_path, straight):
    run_dir = tmp_path / "run"
    cfg = stop_config(tmp_path / "run.yaml", kjv_dataset, run_dir, 1, save_every=2, stall_timeout_s=STALL_S)
    ds = write_ds(tmp_path / "ds.json")
    run = Launch(launch_cmd("torchrun", 2, cfg, ds), run_dir, {"WANDB_MODE": "offline"})
    try:
        run.wait_for_step(3)
        ranks = run.ranks()
        stalled = ranks[1]
        os.kill(stalled, signal.SIGSTOP)
        t_stop = time.time()
        while time.time() - t_stop < STALL_S + MARGIN_S and run.first_line_with("train.py: stall") is None:
            time.sleep(0.2)
        said = run.first_line_with("train.py: stall")
        assert said is not None, run.out[-3000:]
        assert said - t_stop < STALL_S + MARGIN_S, said - t_stop
        time.sleep(3)  # the live rank leaves at once (os._exit); torchrun SIGKILLs the stopped one 30 s on
        stat = Path(f"/proc/{ranks[0]}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone
    finally:
        run.kill()
    m = re.search(
        rf"rank 1 \(host \S+, pid {stalled}\) has sent no heartbeat for \d+ s, last at step \d+ "
        r"\(heartbeats are [\d.]+ s apart\)\. "
        r"Rank 0 \(host \S+\) stops at step (\d+)",
        run.out,
    )
    assert m, run.out[-3000:]
    status = (run_dir / "EXIT_STATUS").read_text().splitlines()
    assert status[0] == "99 stalled" and status[1].startswith("train.py: stall (train.stall_timeout_s=10)")
    assert not (run_dir / "PREEMPTED").exists()  # nothing was saved at the stall
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    # the last save that finished before the stop (rank 0's step; rank 1 is at most one behind)
    assert latest in (tag_for(int(m[1]) // 2 * 2), tag_for(int(m[1]) // 2 * 2 - 2)), run.out[-3000:]
    assert (run_dir / "checkpoints" / latest / "COMPLETE").is_file()
    # resuming from it replays the uninterrupted run (the steps logged past it are done again)
    check_resume_replays(cfg, ds, run_dir, straight(2), {"WANDB_MODE": "offline"})

"""DeepSpeed's C++ ops build into the virtualenv, and a build lock left by a killed build is
cleared with a warning instead of being waited on forever."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.training.conftest import ROOT, env, launch_cmd, write_config, write_ds


def test_ops_build_into_the_virtualenv_unless_told_otherwise(tmp_path):
    code = "from roberta_ds.training.op_builds import extensions_dir; print(extensions_dir())"
    e = {k: v for k, v in env().items() if k != "TORCH_EXTENSIONS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True)
    assert out.stdout.strip() == os.path.join(sys.prefix, "torch_extensions"), out.stderr
    e["TORCH_EXTENSIONS_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path), out.stderr


def _copy_of_the_built_op(ext):
    """A throwaway extensions folder holding the virtualenv's built shm_comm (scripts/setup.sh built
    it), so a test loads it instead of compiling for a minute; else the test's first load builds it."""
    built = ROOT / ".venv" / "torch_extensions" / "deepspeed_shm_comm"
    if built.is_dir():
        shutil.copytree(built, ext / "deepspeed_shm_comm")
    return ext


def test_a_process_started_without_activating_the_virtualenv_loads_the_built_op_as_is(tmp_path):
    """`.venv/bin/python train.py` from a plain shell has no .venv/bin on PATH: torch would run the
    system's ninja, which takes the virtualenv ninja's build for another command and rebuilds it
    (or, with no system ninja, cannot load it). The op, loaded first as from the activated
    virtualenv, is loaded again from a PATH without it, unchanged."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("NCCL on a GPU: this shm_comm op is CPU-only")
    bindir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bindir, "ninja")):
        pytest.skip("this Python's folder has no ninja (not a virtualenv made by scripts/setup.sh)")
    ext = _copy_of_the_built_op(tmp_path / "ext")
    code = "from roberta_ds.training.op_builds import ensure_built; ensure_built(['shm_comm'])"
    so = ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    stamps = []
    for path in (os.pathsep.join([bindir, "/usr/bin", "/bin"]), os.pathsep.join(["/usr/bin", "/bin"])):
        e = dict(env(), TORCH_EXTENSIONS_DIR=str(ext), PATH=path)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True)
        assert r.returncode == 0 and so.is_file(), r.stderr[-3000:]
        stamps.append(so.stat().st_mtime_ns)
    assert stamps[1] == stamps[0], "the op was built again"


def test_a_run_after_a_build_killed_midway_starts_normally(kjv_dataset, tmp_path):
    """A build killed part-way (SIGKILL) leaves torch's `lock` file in the op's folder, and torch
    sleeps on it forever. The killed build is stood in for by that file (a real SIGKILL during
    the build was run by hand, docs/reliability.md), in a throwaway folder that holds the
    virtualenv's built op so the run loads it instead of compiling for a minute."""
    ext = _copy_of_the_built_op(tmp_path / "ext")
    (ext / "deepspeed_shm_comm").mkdir(parents=True, exist_ok=True)
    stale = ext / "deepspeed_shm_comm" / "lock"
    stale.touch()
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", kjv_dataset, run_dir, max_steps=2, save_every=0)
    t0 = time.monotonic()
    r = subprocess.run(
        launch_cmd("python", 1, cfg, write_ds(tmp_path / "ds.json")),
        cwd=ROOT,
        env=dict(env(), TORCH_EXTENSIONS_DIR=str(ext)),
        capture_output=True,
        text=True,
        timeout=180,  # without the fix: forever
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"removing {stale}, left by a build of deepspeed_shm_comm that was killed" in r.stderr
    assert not stale.exists() and (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
    print(f"run after the stale lock: {time.monotonic() - t0:.0f} s")


def test_a_live_build_is_waited_for_and_named(tmp_path):
    """A second process finds the build flock held by a live one: after 5 s of quiet retries it
    says whom it waits for, and goes on once that process is gone (the kernel drops a dead
    holder's flock: no stale state to clear)."""
    e = dict(env(), TORCH_EXTENSIONS_DIR=str(tmp_path))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from roberta_ds.training.op_builds import build_guard\nimport time\n"
            "with build_guard():\n    print('held', flush=True); time.sleep(600)\n",
        ],
        cwd=ROOT,
        env=e,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from roberta_ds.training.op_builds import build_guard\nimport logging\n"
                "logging.basicConfig()\nwith build_guard():\n    pass\n",
            ],
            cwd=ROOT,
            env=e,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(7)  # past the 5 s of quiet retries
        assert waiter.poll() is None  # waiting on a live builder, as it should
        holder.kill()  # SIGKILL: no clean-up runs; the kernel releases the flock
        _, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert f"waiting for process {holder.pid} on {socket.gethostname()}, which is building" in err
    finally:
        holder.kill()

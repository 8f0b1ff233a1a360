"""Start a real launch in its own session and wait for its progress (a plain module: the style
keeps test helpers out of conftest imports)."""

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.training.conftest import ROOT, env, launch_cmd, losses, write_config, write_ds


class Launch:
    """A launcher process (and its ranks) in a new session, its output collected with the time
    each line arrived, so a test can tell when a message was printed."""

    def __init__(self, cmd: list[str], run_dir, extra_env: dict | None = None, base_env: dict | None = None):
        self.run_dir = run_dir
        self.started = time.time()
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(base_env or env(), **(extra_env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    @property
    def out(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        """Until this launch has logged `step` (rows an earlier session logged past its last
        checkpoint do not count: a resumed run drops them when it starts logging)."""
        # 180 s ran out for 40 steps of two ranks on an AVX2-only host, whose suite ran 1.5x slower
        deadline = time.time() + timeout
        metrics = self.run_dir / "metrics.jsonl"
        while time.time() < deadline and self.proc.poll() is None:
            if (
                metrics.exists()
                and metrics.stat().st_mtime > self.started
                and max(losses(self.run_dir), default=0) >= step
            ):
                return
            time.sleep(0.2)
        raise AssertionError(f"step {step} not reached in {timeout} s:\n{self.out[-3000:]}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def first_line_with(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def descendants(self) -> list[int]:
        """Every process below the launcher (torch 2.13's torchrun starts its ranks in sessions of
        their own, so a process group does not reach them)."""
        ps = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
        children: dict[int, list[int]] = {}
        for pid, ppid in (map(int, line.split()) for line in ps.splitlines()):
            children.setdefault(ppid, []).append(pid)
        found, todo = [], [self.proc.pid]
        while todo:
            kids = children.get(todo.pop(), [])
            found += kids
            todo += kids
        return found

    def ranks(self) -> dict[int, int]:
        """{RANK: pid} of the processes the launcher started: those with a RANK whose parent has
        none (a DataLoader worker inherits its rank's environment)."""

        def rank_of(pid) -> int | None:
            try:
                env_ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                return None
            return next((int(e[5:]) for e in env_ if e.startswith(b"RANK=")), None)

        found = {}
        for pid in self.descendants():
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            rank = rank_of(pid)
            if rank is not None and rank_of(parent) is None:
                found[rank] = pid
        return found

    def train_processes(self) -> list[int]:
        """The ranks' main processes under any launcher (plain python: the launch itself): those
        running `python [-u] .../train.py` whose parent does not (a DataLoader worker's does)."""

        def runs_train(pid) -> bool:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                return False
            script = next((a for a in argv[1:] if not a.startswith("-")), "")
            return "python" in Path(argv[0]).name and script.endswith("train.py")

        def parent(pid) -> int:
            try:
                return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                return 0

        pids = [self.proc.pid, *self.descendants()]
        return [p for p in pids if runs_train(p) and not runs_train(parent(p))]

    def wait_for_stop_handlers(self, nproc: int, timeout: float = 120) -> None:
        """Until each of the nproc ranks has train.py's stop handler installed (SIGTERM caught: a
        Python process catches SIGINT from its start, SIGTERM only once train.py arms it)."""

        def catches_sigterm(pid) -> bool:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return False
            mask = int(
                next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
            )
            return bool(mask >> (signal.SIGTERM - 1) & 1)

        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            pids = self.train_processes()
            if len(pids) == nproc and all(map(catches_sigterm, pids)):
                return
            time.sleep(0.1)
        raise AssertionError(f"{nproc} ranks with stop handlers not seen in {timeout} s:\n{self.out[-3000:]}")

    def kill(self) -> None:
        """Teardown: the launcher and every process below it, stopped ones included."""
        for pid in [*self.descendants(), self.proc.pid]:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        self.proc.wait(timeout=30)


def ranks_alive(run_dir) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-f", f"--config {run_dir.parent}/run.yaml"], capture_output=True, text=True
    )
    return [p for p in out.stdout.split() if int(p) != os.getpid()]


STRAIGHT_STEPS = 40  # the uninterrupted run a stopped one must replay, to this step


def stop_config(path: Path, dataset: Path, run_dir: Path, workers: int, **train) -> Path:
    """The config of a run that is stopped part-way: max_steps 2000 (its schedule), no periodic save
    unless given."""
    cfg = write_config(path, dataset, run_dir, **{"max_steps": 2000, "save_every": 0, **train})
    cfg.write_text(cfg.read_text().replace("num_workers: 0", f"num_workers: {workers}"))
    return cfg


def straight_losses(dataset: Path, tmp: Path, world: int) -> dict[int, float]:
    """Per-step losses of an uninterrupted run of stop_config's schedule, to STRAIGHT_STEPS."""
    cfg = stop_config(tmp / "run.yaml", dataset, tmp / "run", workers=0)
    launcher = "python" if world == 1 else "torchrun"
    run = Launch(launch_cmd(launcher, world, cfg, write_ds(tmp / "ds.json")), tmp / "run")
    try:
        run.wait_for_step(STRAIGHT_STEPS)
    finally:
        run.kill()
    return losses(tmp / "run")


def check_resume_replays(cfg: Path, ds: Path, run_dir: Path, want: dict[int, float], extra_env=None) -> None:
    """Resume the run (torchrun, 2 ranks, `--resume auto`) for two steps past its latest checkpoint,
    stop it, and check that every step's loss is the uninterrupted run's."""
    resumed_at = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    run = Launch(launch_cmd("torchrun", 2, cfg, ds, "--resume", "auto"), run_dir, extra_env)
    try:
        run.wait_for_step(resumed_at + 2)
        run.proc.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
    finally:
        run.kill()
    got = losses(run_dir)
    assert f"at step {resumed_at}" in run.out, run.out[-3000:]
    assert max(got) < STRAIGHT_STEPS and sorted(got) == list(range(1, max(got) + 1)), sorted(got)
    assert got == {s: want[s] for s in got}

"""A real Slurm cluster for tests: munge, slurmctld and two slurmd daemons on this host, simulating
nodes 127.0.0.1 and 127.0.0.2 (distinct ports, per-node spool/TmpFS). Needs root and Debian's
slurmctld, slurmd, slurm-client and munge. Daemons run in their own process session and are
stopped by PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

NODES = ("127.0.0.1", "127.0.0.2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# AuthInfo's cred_expire (Slurm's default 120 s) is also how long Slurm holds a requeued job before
# it may start again: 20 s keeps the requeue tests two minutes shorter each and still leaves a step
# launch on a loaded 2-core host time to present its credential (the minimum is 5 s).
SLURM_CONF = """\
ClusterName=rdstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge-run/munge.socket.2,cred_expire=20
CredType=cred/munge
StateSaveLocation={d}/ctld
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
TmpFS={d}/tmp-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def available() -> str | None:
    """None when a cluster can start here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for exe in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not shutil.which(exe):
            return f"{exe} not installed (apt-get install slurmctld slurmd slurm-client munge)"
    return None


class Cluster:
    def __init__(self, root: Path):
        self.d = root
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def start(self) -> Cluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # daemons already spawned must not outlive a failed start
            raise

    def _start(self) -> Cluster:
        d = self.d
        os.chmod(d, 0o755)  # munge refuses a socket inside a folder others cannot traverse
        for sub in (
            "ctld",
            "munge",
            "munge-run",
            *[f"spool-{n}" for n in NODES],
            *[f"tmp-{n}" for n in NODES],
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge-run", 0o755)
        # Free ports, not fixed ones: a leftover daemon elsewhere on the machine must not break the tests.
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr={n} Port={_free_port()} "
            "CPUs=2 Gres=gpu:2 State=UNKNOWN"
            for n in NODES
        )
        (d / "slurm.conf").write_text(SLURM_CONF.format(d=d, nodes=nodes, ctld_port=_free_port()))
        # GPU gres so that `#SBATCH --gpus-per-node` lines are accepted: slurmd counts device files.
        lines = []
        for i, n in enumerate(NODES):
            for g in range(2):
                dev = d / f"nvidia{i}{g}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null twin
            lines.append(f"NodeName={n} Name=gpu File={d}/nvidia{i}[0-1]\n")
        (d / "gres.conf").write_text("".join(lines))
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = d / "munge-run" / "munge.socket.2"
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={d}/munge-run/munged.pid",
                f"--log-file={d}/munged.log",
                f"--seed-file={d}/munge/seed",
            ]
        )
        self._wait(lambda: sock.exists(), "munged")  # slurm.conf's AuthInfo points Slurm at this socket
        self._spawn(["slurmctld", "-D", "-i", "-f", str(d / "slurm.conf")])
        for n in NODES:
            self._spawn(["slurmd", "-D", "-N", n, "-f", str(d / "slurm.conf")])
        self._wait(self._nodes_idle, "two idle nodes", timeout=60)
        return self

    def _spawn(self, cmd: list[str]) -> None:
        with open(
            self.d / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "w"
        ) as log:  # the child keeps its fd
            self.procs.append(
                subprocess.Popen(
                    cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _wait(self, ok, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{p.args[0]} exited ({p.returncode}) waiting for {what}:\n{self.logs()}"
                    )
            time.sleep(0.5)
        raise TimeoutError(f"Slurm test cluster: no {what} after {timeout} s:\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        return sum("idle" in line for line in out.splitlines()) == len(NODES)

    def logs(self) -> str:
        parts = []
        for f in sorted(self.d.glob("*.log")) + sorted(self.d.glob("*.out")):
            parts.append(f"--- {f.name}\n{f.read_text()[-1500:]}")
        return "\n".join(parts)

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{cmd}: {res.stdout}{res.stderr}")
        return res

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or {}).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(
        self,
        job_id: int,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
        timeout: float = 300,
    ) -> dict[str, str]:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

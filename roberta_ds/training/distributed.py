"""Process-group start-up for every launcher: torchrun / deepspeed (env://), srun (SLURM_*),
mpirun (mpi4py discovery), or a plain `python train.py` (one process).

MPI discovery is ours, not DeepSpeed's `auto_mpi_discovery`: DeepSpeed overwrites MASTER_ADDR with
the first address of `hostname -I`, which is the wrong network on clusters with several (and leaves
no way to pin it); here an exported MASTER_ADDR/MASTER_PORT wins and rank 0's host name is the default.
The rendezvous is bounded by RDZV_TIMEOUT seconds (default 600) and failures name the master."""

from __future__ import annotations

import datetime
import os
import socket

import torch

from roberta_ds.errors import RendezvousError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_mpi() -> bool:
    return any(
        k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
    )


def fill_env_from_slurm() -> None:
    """srun starts one task per GPU and sets SLURM_PROCID etc.; map them onto torch's variables.
    The one owner of this mapping: slurm/pretrain.sbatch runs `srun python train.py` and sets none
    of RANK, LOCAL_RANK, WORLD_SIZE itself (a launcher under srun, e.g. DeepSpeed's, sets RANK: kept)."""
    env = os.environ
    # Only inside an srun step (SLURM_STEP_ID): the batch script itself is one process, not the job's tasks.
    if "RANK" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise RuntimeError(
            "running under srun without MASTER_ADDR/MASTER_PORT; start through slurm/pretrain.sbatch "
            "or export them (first host of SLURM_JOB_NODELIST, a free port)"
        )


def expected_world_size() -> int:
    """The world size the launcher asked for, read before the process group exists."""
    fill_env_from_slurm()
    env = os.environ
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if key in env:
            return int(env[key])
    return 1


def expected_rank() -> int:
    """This process's rank as the launcher set it, read before the process group exists."""
    fill_env_from_slurm()
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def expected_local_world_size() -> int:
    """Ranks on this node (they share its host memory and GPUs)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return expected_world_size()


def fill_env_from_mpi() -> None:
    """mpirun / srun --mpi=pmix: rank, size and local rank from mpi4py; the master from the env
    or rank 0's host name, the port from the env or one rank 0 finds free."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    master = (
        os.environ.get("MASTER_ADDR") or socket.gethostname(),
        os.environ.get("MASTER_PORT") or str(_free_port()),
    )
    master = comm.bcast(master, root=0)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(local.Get_rank()),
        MASTER_ADDR=master[0],
        MASTER_PORT=master[1],
    )
    local.Free()


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, int]:
    """Start the default process group; returns (rank, local_rank, world_size)."""
    import deepspeed

    env = os.environ
    fill_env_from_slurm()
    if "RANK" not in env and _under_mpi():
        fill_env_from_mpi()
    if "RANK" not in env:  # plain `python train.py`: a world of one
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    timeout_s = timeout_s or float(env.get("RDZV_TIMEOUT", 600))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
    except Exception as e:  # TCPStore timeouts and refused connections come in several types
        raise RendezvousError(
            f"rank {env['RANK']}/{env['WORLD_SIZE']} could not join the process group at master "
            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} within {timeout_s:.0f} s (RDZV_TIMEOUT): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check that rank 0 started, "
            "that MASTER_ADDR resolves on every node and that the port is open."
        ) from None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def all_agree(flag: bool) -> bool:
    """True when any rank says True (a MAX all-reduce): used for stop decisions at step boundaries."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def rank0_does(fn, error_type: type[Exception]):
    """Run `fn` on rank 0 only and share its verdict with every rank before anyone waits on a
    barrier: on failure every rank raises `error_type` with rank 0's message at once (instead of
    the others sitting in a barrier until the process-group timeout). Returns fn's result on rank 0."""
    result, verdict = None, [None]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # shared, then re-raised with its traceback on rank 0
            verdict[0] = f"{e}"
            if torch.distributed.is_initialized():
                torch.distributed.broadcast_object_list(verdict, src=0)
            raise
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise error_type(f"rank 0 failed: {verdict[0]}")
    return result


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: gloo's worker threads otherwise
    may release Python tensors during finalisation and abort the process (seen under mpirun)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

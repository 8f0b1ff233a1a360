# Shared environment for every roberta-ds Slurm job: sourced by the sbatch scripts on each node.
# Edit here (one place) for your cluster's fabric.

# NCCL: report problems once, fail fast on errors instead of hanging.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand / RoCE clusters usually want these; uncomment and adapt:
# export NCCL_IB_HCA=mlx5
# export NCCL_SOCKET_IFNAME=ib0        # or the Ethernet interface that reaches the other nodes
# export NCCL_NET_GDR_LEVEL=PHB

# One CPU thread per rank for the data loader / host-side work unless told otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
# Rendezvous: give up (and fail the job) after this many seconds instead of hanging.
export RDZV_TIMEOUT=${RDZV_TIMEOUT:-600}
export PYTHONUNBUFFERED=1

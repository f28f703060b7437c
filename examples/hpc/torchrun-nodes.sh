#!/usr/bin/env bash
# Data-parallel training over the nodes of one SLURM allocation: torchrun on every node
# (one srun task per node), one training process per GPU, meeting at the first node.
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gres=gpu:4 --cpus-per-task=32 --mem=0 \
#       torchrun-nodes.sh DATA.zarr RUN_DIR [deepcad-chunked train options...]
#
# DATA.zarr (converted beforehand) and RUN_DIR must be on a filesystem every node sees. The
# batch (--batch-size) is shared by all processes: make it a multiple of nodes × GPUs. A rerun
# with --resume continues from the last finished epoch (e.g. after the time limit).
#SBATCH --job-name=deepcad-train
#SBATCH --time=08:00:00
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 DATA.zarr RUN_DIR [deepcad-chunked train options...]" >&2
    exit 2
fi
[[ -n ${SLURM_JOB_ID:-} ]] || { echo "$0: not inside a SLURM allocation" >&2; exit 2; }
data=$1 run_dir=$2
shift 2

first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_ON_NODE:-1}   # one process per GPU of the node (one on a CPU node)
# module load cuda   # site-specific
srun --ntasks-per-node=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$gpus" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$first:29500" \
    -m deepcad_chunked train "$data" -o "$run_dir" "$@"

#!/usr/bin/env bash
# The whole pipeline (convert → train → denoise) inside one SLURM allocation: a dask scheduler
# in this script's step, one worker per task of the allocation started with srun, and
# `deepcad-chunked run` joined to them through a scheduler file. Training runs as one task on a
# worker; conversion and denoising use all of them.
#
#   sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 --cpus-per-task=8 --mem=0 \
#       run-in-allocation.sh SRC OUTDIR [deepcad-chunked run options...]
#   # or, inside `salloc ...`:  bash run-in-allocation.sh SRC OUTDIR --export
#
# Give each task one GPU (4 tasks per node with 4 GPUs per node, as above); the workers then
# advertise a GPU resource and use the GPU of their task. Without GPUs the same script runs on
# CPU workers. SRC and OUTDIR must be on a filesystem every node sees. Activate the Python
# environment that has deepcad-chunked before submitting (sbatch passes it on), or load it
# below. A rerun with the same OUTDIR resumes what was cut (e.g. by the time limit).
#SBATCH --job-name=deepcad
#SBATCH --time=08:00:00
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 SRC OUTDIR [deepcad-chunked run options...]" >&2
    exit 2
fi
src=$1 outdir=$2
shift 2
[[ -n ${SLURM_JOB_ID:-} ]] || { echo "$0: not inside a SLURM allocation" >&2; exit 2; }

# module load cuda   # site-specific
mkdir -p "$outdir"
dask_dir=$(mktemp -d "$outdir/.dask-XXXXXX")
scheduler_file=$dask_dir/scheduler.json
cleanup() {
    kill "${workers_pid:-}" "${scheduler_pid:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dask_dir"
}
trap cleanup EXIT

# The scheduler listens on this node's address (the other nodes must reach it).
python -m distributed.cli.dask_scheduler --scheduler-file "$scheduler_file" \
    --dashboard-address :0 >"$dask_dir/scheduler.log" 2>&1 &
scheduler_pid=$!
for _ in $(seq 120); do [[ -s $scheduler_file ]] && break; sleep 0.5; done
[[ -s $scheduler_file ]] || { cat "$dask_dir/scheduler.log" >&2; exit 1; }

# Each worker's memory: its share of the allocation (SLURM gives MiB).
if [[ -n ${SLURM_MEM_PER_CPU:-} ]]; then
    memory=$(( SLURM_MEM_PER_CPU * ${SLURM_CPUS_PER_TASK:-1} ))MiB
elif [[ ${SLURM_MEM_PER_NODE:-0} != 0 ]]; then
    memory=$(( SLURM_MEM_PER_NODE / ${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}} ))MiB
else
    memory=auto
fi
resources=()
if [[ -n ${SLURM_GPUS_ON_NODE:-}${SLURM_JOB_GPUS:-}${CUDA_VISIBLE_DEVICES:-} ]]; then
    resources=(--resources GPU=1)
fi
# One worker per task, with the task's cores as threads; --overlap lets the steps share the
# allocation with this script's own step.
srun --overlap --kill-on-bad-exit=0 \
    python -m distributed.cli.dask_worker --scheduler-file "$scheduler_file" \
    --nthreads "${SLURM_CPUS_PER_TASK:-1}" --nworkers 1 --memory-limit "$memory" \
    --local-directory "${TMPDIR:-/tmp}" "${resources[@]}" \
    >"$dask_dir/workers.log" 2>&1 &
workers_pid=$!

deepcad-chunked run "$src" -o "$outdir" --cluster "$scheduler_file" "$@"

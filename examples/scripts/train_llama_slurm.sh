#!/usr/bin/env bash
#SBATCH --job-name=sepo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
# Multi-node run of any examples/scripts/*.sh under slurm, the way OpenRLHF's own slurm scripts do it:
#   sbatch examples/scripts/train_llama_slurm.sh examples/scripts/train_selective_llama.sh [ARGS...]
# The training script is sourced in `slurm` mode, which only prepares SEPO_CMD=(MODULE ARGS...); this
# script then starts one torchrun per node with srun.
set -euo pipefail
SCRIPT="$1"
shift
source "$SCRIPT" slurm "$@"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m "${SEPO_CMD[@]}"

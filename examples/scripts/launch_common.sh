# Shared launcher, sourced as the last line of every examples/scripts/*.sh after it set
#   MODULE=<python module of an OpenRLHF-style entrypoint>   DEFAULTS=(<default arguments>)
# Arguments given to the script follow the defaults, so they win (argparse keeps the last value).
#
#   bash SCRIPT.sh [ARGS...]          GPUs: deepspeed --module $MODULE  (one node, all visible GPUs)
#   HOSTFILE=hosts bash SCRIPT.sh     several nodes through DeepSpeed's hostfile launcher
#   SEPO_DEVICE=cpu bash SCRIPT.sh    CPU: torchrun with $SEPO_NPROC gloo ranks (default 2) through
#                                     openrlhf_sepo.cpu, attention $SEPO_ATTN (default sdpa)
#   bash SCRIPT.sh slurm [ARGS...]    prepare only: sets SEPO_CMD=(...) for a slurm launcher that sources
#                                     this script (see train_llama_slurm.sh); nothing is run
#   SEPO_DRY_RUN=1 bash SCRIPT.sh     print the command instead of running it
# Environment: PYTHON (default python3), DEEPSPEED_ARGS (extra launcher args, e.g. "--num_gpus 4").
#
# A script that also sets SEPO_LAUNCHER=ray (Ray PPO: the entrypoint starts its own Ray workers) is run as
# `$PYTHON -m $MODULE` by one process: on GPUs unchanged (Ray starts locally or joins RAY_ADDRESS), and with
# SEPO_DEVICE=cpu with the CPU settings SEPO_RAY_CPU_ARGS below (sdpa, one rank per model group, one engine, gloo
# weight sync; the vLLM stand-in and logical GPUs come with the entrypoint); slurm mode prepares the same SEPO_CMD.

SEPO_MODE=run
if [[ "${1:-}" == "slurm" ]]; then
  SEPO_MODE=slurm
  shift
fi

# A default --data.dataset_split (train_prefs, train_sft) names a split of the default hub data set only. With the
# user's own --data.dataset and no --data.dataset_split, it is dropped, so OpenRLHF's default split "train" applies
# (the only split a local jsonl / json / parquet file has); kept, OpenRLHF would fail on a split the file lacks.
# An explicit --data.dataset_split is always kept.
SEPO_USER_DATASET= SEPO_USER_SPLIT=
for arg in "$@"; do
  case "$arg" in
    --data.dataset | --data.dataset=*) SEPO_USER_DATASET=1 ;;
    --data.dataset_split | --data.dataset_split=*) SEPO_USER_SPLIT=1 ;;
  esac
done
if [[ -n "$SEPO_USER_DATASET" && -z "$SEPO_USER_SPLIT" ]]; then
  SEPO_KEPT=()
  for ((i = 0; i < ${#DEFAULTS[@]}; i++)); do
    if [[ "${DEFAULTS[i]}" == --data.dataset_split ]]; then
      i=$((i + 1))  # and its value
    else
      SEPO_KEPT+=("${DEFAULTS[i]}")
    fi
  done
  DEFAULTS=("${SEPO_KEPT[@]}")
fi

PYTHON="${PYTHON:-python3}"
SEPO_RAY_CPU_ARGS=(--actor.num_gpus_per_node 1 --critic.num_gpus_per_node 1 --ref.num_gpus_per_node 1
                   --reward.num_gpus_per_node 1 --vllm.num_engines 1 --vllm.tensor_parallel_size 1
                   --vllm.sync_backend gloo)
if [[ "${SEPO_LAUNCHER:-deepspeed}" == "ray" ]]; then
  if [[ -n "${HOSTFILE:-}" ]]; then
    echo "HOSTFILE does not apply to a Ray launch: start Ray on the nodes and set RAY_ADDRESS" >&2
    exit 2
  fi
  if [[ "${SEPO_DEVICE:-gpu}" == "cpu" ]]; then
    SEPO_ARGS=("${DEFAULTS[@]}" "${SEPO_RAY_CPU_ARGS[@]}" --ds.attn_implementation "${SEPO_ATTN:-sdpa}" "$@")
  else
    SEPO_ARGS=("${DEFAULTS[@]}" "$@")
  fi
  SEPO_LAUNCH=("$PYTHON" -m "$MODULE")
elif [[ "${SEPO_DEVICE:-gpu}" == "cpu" ]]; then
  # sdpa/eager only on CPU: flash-attn kernels cannot exist there. Placed before the user's arguments so
  # that an explicit --ds.attn_implementation still wins.
  SEPO_ARGS=("${DEFAULTS[@]}" --ds.attn_implementation "${SEPO_ATTN:-sdpa}" "$@")
  SEPO_LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "${SEPO_NPROC:-2}"
               --master_port "${MASTER_PORT:-$("$PYTHON" -c 'import openrlhf_sepo.cpu as c; print(c.free_port())')}"
               -m openrlhf_sepo.cpu "$MODULE")
else
  SEPO_ARGS=("${DEFAULTS[@]}" "$@")
  SEPO_LAUNCH=(deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${DEEPSPEED_ARGS:-} --module "$MODULE")
fi
SEPO_CMD=("$MODULE" "${SEPO_ARGS[@]}")

if [[ "$SEPO_MODE" == "slurm" ]]; then
  return 0 2>/dev/null || exit 0
fi
if [[ -n "${SEPO_DRY_RUN:-}" ]]; then
  printf '%q ' "${SEPO_LAUNCH[@]}" "${SEPO_ARGS[@]}"
  echo
  exit 0
fi
set -x
exec "${SEPO_LAUNCH[@]}" "${SEPO_ARGS[@]}"

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

SEPO_MODE=run
if [[ "${1:-}" == "slurm" ]]; then
  SEPO_MODE=slurm
  shift
fi

PYTHON="${PYTHON:-python3}"
if [[ "${SEPO_DEVICE:-gpu}" == "cpu" ]]; then
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

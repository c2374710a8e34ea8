#!/usr/bin/env bash
# A token-level reward model learned from ranked lists (preference-grounded guidance; openrlhf_sepo.cli.train_token_rm):
# SePO's second token scorer (score_tokens --scorer token_rm) and the weights of train_wmle. docs/token_rm.md.
# Default data: the pipeline's preference pairs (UltraFeedback-binarized), each a ranked list of two (ListMLE is then
# Bradley-Terry). For ranked lists: --data.dataset LISTS --data.prompt_key prompt --data.responses_key responses
# --data.scores_key scores (K responses and K scores per row). From the SFT reference, as train_rm_llama.sh: lr 9e-6,
# 1 epoch, bf16, ZeRO-3, gradient checkpointing; token rewards softplus-bounded, sequence score avg.
# Arguments after the script name override the defaults; SEPO_DEVICE=cpu runs on CPU ranks (launch_common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/preference_data.sh"
MODULE=openrlhf_sepo.cli.train_token_rm
DEFAULTS=(
  --model.model_name_or_path ./checkpoint/tinyllama-sft
  "${PREFERENCE_DATA[@]}"
  --token_rm.activation softplus
  --token_rm.aggregation avg
  --token_rm.tau 2.0
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 1
  --adam.lr 9e-6
  --ds.param_dtype bf16
  --ds.zero_stage 3
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-token-rm
  --ckpt.path ./checkpoint/tinyllama-token-rm/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

#!/usr/bin/env bash
# SePO step 2, the oracle: DPO from the SFT reference with OpenRLHF's own train_dpo.
# Published setup: TinyLlama SFT -> DPO on UltraFeedback-binarized, beta 0.1, lr 5e-7, 1 epoch, bf16, ZeRO-2.
# The same script trains the all-token DPO baseline. Arguments after the script name override the defaults.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/preference_data.sh"
MODULE=openrlhf.cli.train_dpo
DEFAULTS=(
  --model.model_name_or_path ./checkpoint/tinyllama-sft
  --ref.model_name_or_path ./checkpoint/tinyllama-sft
  "${PREFERENCE_DATA[@]}"
  --model.beta 0.1
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 2
  --adam.lr 5e-7
  --ds.param_dtype bf16
  --ds.zero_stage 2
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-dpo-oracle
  --ckpt.path ./checkpoint/tinyllama-dpo-oracle/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

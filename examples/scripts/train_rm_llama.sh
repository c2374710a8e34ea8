#!/usr/bin/env bash
# Optional: a reward model with OpenRLHF's own train_rm, to score generations in evaluation
# (python -m openrlhf_sepo.cli.evaluate --reward.model_name_or_path ./checkpoint/tinyllama-rm).
# Pipeline: train_sft_llama.sh -> train_rm_llama.sh -> train_dpo_llama.sh -> SePO -> evaluate.
# Published-style setup: from the SFT reference, UltraFeedback-binarized, lr 9e-6, 1 epoch, max_len 2048,
# bf16, ZeRO-3, gradient checkpointing. Arguments after the script name override the defaults.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/preference_data.sh"
MODULE=openrlhf.cli.train_rm
DEFAULTS=(
  --model.model_name_or_path ./checkpoint/tinyllama-sft
  "${PREFERENCE_DATA[@]}"
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 1
  --adam.lr 9e-6
  --ds.param_dtype bf16
  --ds.zero_stage 3
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-rm
  --ckpt.path ./checkpoint/tinyllama-rm/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

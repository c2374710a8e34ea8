#!/usr/bin/env bash
# SePO step 1, the reference model: supervised fine-tuning with OpenRLHF's own train_sft.
# Published setup: TinyLlama on UltraChat-200k, lr 5e-6, 1 epoch, max_len 2048, bf16, ZeRO-2.
# Any argument after the script name overrides the defaults below (see launch_common.sh for devices).
set -euo pipefail
MODULE=openrlhf.cli.train_sft
DEFAULTS=(
  --model.model_name_or_path TinyLlama/TinyLlama_v1.1
  --data.dataset HuggingFaceH4/ultrachat_200k
  --data.dataset_split train_sft
  --data.input_key messages
  --data.apply_chat_template
  --data.max_len 2048
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 4
  --adam.lr 5e-6
  --ds.param_dtype bf16
  --ds.zero_stage 2
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-sft
  --ckpt.path ./checkpoint/tinyllama-sft/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

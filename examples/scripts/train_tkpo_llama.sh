#!/usr/bin/env bash
# TKPO, token-level preference self-alignment for controllable generation (openrlhf_sepo.cli.train_tkpo, docs/tkpo.md):
# CE on the gold response plus lambda * a list-wise token-level term whose negatives the model itself samples on the
# prompt with its style attribute swapped. No rejected responses, no reference model.
# Data: SFT rows with a prompt, a response and the prompt's attribute (here a `style` column whose text occurs in the
# prompt, swapped by --tkpo.swap_map), or a ready counterfactual prompt (--tkpo.counterfactual_key).
# The released code's values: 20 negatives, tau 0.15, lambda 0.5, negatives without gradient, -log(mean_t r_t).
# Arguments after the script name override the defaults; SEPO_DEVICE=cpu runs on CPU ranks (launch_common.sh).
set -euo pipefail
MODULE=openrlhf_sepo.cli.train_tkpo
DEFAULTS=(
  --model.model_name_or_path ./checkpoint/tinyllama-sft
  --data.dataset ./data/controllable_sft.jsonl
  --data.input_key prompt
  --data.output_key response
  --data.apply_chat_template
  --data.max_len 2048
  --tkpo.attribute_key style
  --tkpo.swap_map '{"concise": "detailed", "detailed": "concise", "objective": "literary", "literary": "objective"}'
  --tkpo.num_negatives 20
  --tkpo.tau 0.15
  --tkpo.lambda 0.5
  --tkpo.aggregation log_mean
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 4
  --adam.lr 5e-6
  --ds.param_dtype bf16
  --ds.zero_stage 2
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-tkpo
  --ckpt.path ./checkpoint/tinyllama-tkpo/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

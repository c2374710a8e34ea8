#!/usr/bin/env bash
# Reward-weighted MLE (preference-grounded token-level guidance, Yang et al. 2023): fine-tune the SFT policy on the
# chosen responses of a scores dir, each token's NLL weighted by its normalised token reward,
# w_t = r_t / sum_t' r_t' (openrlhf_sepo.cli.train_wmle, on OpenRLHF's SFT trainer; docs/wmle.md).
# Reads the token rewards a learned token RM wrote (score_tokens_llama.sh --scorer token_rm); for the
# oracle/reference log-ratio scores (any sign) add `--data.dataset ./checkpoint/tinyllama-token-scores
# --wmle.weight exp`. SFT-like settings: lr 5e-6, 1 epoch, global batch 128, micro batch 4, bf16, ZeRO-2.
# Arguments after the script name override the defaults; SEPO_DEVICE=cpu runs on CPU ranks (launch_common.sh).
set -euo pipefail
MODULE=openrlhf_sepo.cli.train_wmle
DEFAULTS=(
  --model.model_name_or_path ./checkpoint/tinyllama-sft
  --data.dataset ./checkpoint/tinyllama-token-rm-scores
  --data.max_len 2048
  --wmle.side chosen
  --wmle.weight reward
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 4
  --adam.lr 5e-6
  --ds.param_dtype bf16
  --ds.zero_stage 2
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-wmle
  --ckpt.path ./checkpoint/tinyllama-wmle/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

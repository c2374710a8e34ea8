#!/usr/bin/env bash
# SePO step 5, the policy: train on the selected key tokens only, no reference model (openrlhf_sepo.cli.train_sepo).
# Reads the token scores written by score_tokens_llama.sh; k_chosen / k_rejected / selection are picked here, at
# train time, without re-scoring. Published setup: TinyLlama SFT policy, SimPO-style loss on 30% of the tokens
# (beta 1, gamma 0), lr 5e-7, 1 epoch, global batch 128, micro batch 1, max_len 4096, bf16, ZeRO-3. One default of
# train_sepo differs from the paper (docs/sepo.md): OpenRLHF's NLL term on the chosen response is on;
# `--model.nll_loss_coef 0` is the published objective.
# Arguments after the script name override the defaults; SEPO_DEVICE=cpu runs on CPU ranks (launch_common.sh).
set -euo pipefail
MODULE=openrlhf_sepo.cli.train_sepo
DEFAULTS=(
  --model.model_name_or_path ./checkpoint/tinyllama-sft
  --data.dataset ./checkpoint/tinyllama-token-scores
  --data.max_len 4096
  --sepo.k_chosen 0.3
  --sepo.k_rejected 0.3
  --sepo.selection per_response
  --sepo.beta 1.0
  --sepo.gamma 0.0
  --train.max_epochs 1
  --train.batch_size 128
  --train.micro_batch_size 1
  --adam.lr 5e-7
  --ds.param_dtype bf16
  --ds.zero_stage 3
  --ds.attn_implementation flash_attention_2
  --model.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-sepo
  --ckpt.path ./checkpoint/tinyllama-sepo/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

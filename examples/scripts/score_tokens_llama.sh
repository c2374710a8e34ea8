#!/usr/bin/env bash
# SePO step 3: score every response token of the preference data once with the oracle (DPO) and the
# reference (SFT): r_t = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t). Any selection ratio k can
# then be trained from the scores dir. Data flags must match the ones the policy will be trained with
# (same as train_dpo_llama.sh). Each GPU scores its own shards; a killed run resumes when started again.
# Arguments after the script name override the defaults; SEPO_DEVICE=cpu runs it on CPU ranks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/preference_data.sh"
MODULE=openrlhf_sepo.cli.score_tokens
DEFAULTS=(
  --oracle.model_name_or_path ./checkpoint/tinyllama-dpo-oracle
  --ref.model_name_or_path ./checkpoint/tinyllama-sft
  "${PREFERENCE_DATA[@]}"
  --score.micro_batch_size 8
  --score.max_tokens 65536
  --ds.param_dtype bf16
  --ds.attn_implementation flash_attention_2
  --k_perc 0.1,0.3,0.5
  --output_dir ./checkpoint/tinyllama-token-scores
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

#!/usr/bin/env bash
# SePO step 3: score every response token of the preference data once with the oracle (DPO) and the
# reference (SFT): r_t = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t). Any selection ratio k can
# then be trained from the scores dir. Data flags must match the ones the policy will be trained with
# (same as train_dpo_llama.sh). Each GPU scores its own shards; a killed run resumes when started again.
# Arguments after the script name override the defaults; SEPO_DEVICE=cpu runs it on CPU ranks.
#
# With a learned token reward model (a train_token_rm checkpoint) instead of the oracle/reference pair:
#   bash examples/scripts/score_tokens_llama.sh --scorer token_rm --token_rm.model_name_or_path ./checkpoint/tinyllama-token-rm
# r_t is then the token RM's reward of token t; the scores dir has the same format, for train_sepo as it is.
# The token RM's tokenizer must be the policy's (train_sepo checks the fingerprint).
#
# An oracle of another tokenizer (e.g. a small model of another family) for a policy: add
#   --policy.tokenizer ./checkpoint/big-policy-sft
# the ids written are the policy's; the oracle's token rewards are mapped onto them by character overlap.
# HH-shaped pairs (whole dialogues, no prompt column): --data.prompt_split marker (or common_prefix).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/preference_data.sh"
MODULE=openrlhf_sepo.cli.score_tokens

# Which scorer the arguments ask for (argparse keeps the last --scorer, so do we). The scorer's own defaults
# are chosen here, not overridden: score_tokens refuses --oracle.* / --ref.* with --scorer token_rm (a model
# path that is silently ignored would hide a mistake), so with --scorer token_rm the oracle/reference defaults
# are left out, and the output dir default changes too, so that the two scorers' scores never meet in one dir.
SCORER=oracle_ref
previous=
for arg in "$@"; do
  if [[ "$previous" == --scorer ]]; then SCORER="$arg"; fi
  if [[ "$arg" == --scorer=* ]]; then SCORER="${arg#--scorer=}"; fi
  previous="$arg"
done
if [[ "$SCORER" == token_rm ]]; then
  SCORER_DEFAULTS=(
    --token_rm.model_name_or_path ./checkpoint/tinyllama-token-rm
    --output_dir ./checkpoint/tinyllama-token-rm-scores
  )
else
  SCORER_DEFAULTS=(
    --oracle.model_name_or_path ./checkpoint/tinyllama-dpo-oracle
    --ref.model_name_or_path ./checkpoint/tinyllama-sft
    --output_dir ./checkpoint/tinyllama-token-scores
  )
fi

DEFAULTS=(
  "${SCORER_DEFAULTS[@]}"
  "${PREFERENCE_DATA[@]}"
  --score.micro_batch_size 8
  --score.max_tokens 65536
  --ds.param_dtype bf16
  --ds.attn_implementation flash_attention_2
  --k_perc 0.1,0.3,0.5
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

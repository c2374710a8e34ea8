#!/usr/bin/env bash
# PPO with dense per-token rewards (openrlhf_sepo.cli.train_ppo_dense): OpenRLHF's own Ray PPO (train_ppo_ray, all its
# flags) with RTO's oracle reward d_t = coef * (log pi_oracle(y_t) - log pi_ref(y_t)) added to the shaped reward
# (docs in openrlhf_sepo/ppo_dense.py). The oracle is the DPO model of train_dpo_llama.sh, the reference PPO's own
# (the SFT model), the sequence reward the reward model of train_rm_llama.sh. DENSE_SOURCE picks the source (the
# dense flags refuse a model path of another source, so it is chosen here, not by overriding flags):
# DENSE_SOURCE=token_rm uses the token reward model of train_token_rm_llama.sh (DENSE_TOKEN_RM), DENSE_SOURCE=none is
# OpenRLHF's PPO unchanged. One node, 8 GPUs: actor 2, critic 2, reference 1, reward 1, vLLM engine 1, oracle 1.
# Ray: the driver starts a local Ray instance, or joins the cluster named by RAY_ADDRESS (several nodes: start Ray
# there, then run this script on the head node). Arguments after the script name override the defaults;
# SEPO_DEVICE=cpu runs on the CPU with a vLLM stand-in (launch_common.sh).
set -euo pipefail
MODULE=openrlhf_sepo.cli.train_ppo_dense
SEPO_LAUNCHER=ray
case "${DENSE_SOURCE:-oracle}" in
  oracle) DENSE=(--dense.source oracle --dense.oracle "${DENSE_ORACLE:-./checkpoint/tinyllama-dpo-oracle}") ;;
  token_rm) DENSE=(--dense.source token_rm --dense.token_rm "${DENSE_TOKEN_RM:-./checkpoint/tinyllama-token-rm}") ;;
  none) DENSE=(--dense.source none) ;;
  *) echo "DENSE_SOURCE: oracle, token_rm or none, got '${DENSE_SOURCE}'" >&2; exit 2 ;;
esac
DEFAULTS=(
  "${DENSE[@]}"
  --actor.model_name_or_path ./checkpoint/tinyllama-sft
  --reward.model_name_or_path ./checkpoint/tinyllama-rm
  --data.prompt_dataset OpenRLHF/prompt-collection-v0.1
  --data.input_key context_messages
  --data.apply_chat_template
  --data.max_len 2048
  --data.max_samples 100000
  --rollout.max_new_tokens 1024
  --actor.num_gpus_per_node 2
  --critic.num_gpus_per_node 2
  --ref.num_gpus_per_node 1
  --reward.num_gpus_per_node 1
  --vllm.num_engines 1
  --vllm.tensor_parallel_size 1
  --vllm.sync_backend nccl
  --train.num_episodes 1
  --rollout.batch_size 1024
  --rollout.micro_batch_size 16
  --train.batch_size 128
  --train.micro_batch_size 8
  --train.max_epochs 1
  --actor.adam.lr 5e-7
  --critic.adam.lr 9e-6
  --algo.kl.init_coef 0.01
  --ds.param_dtype bf16
  --ds.zero_stage 3
  --ds.attn_implementation flash_attention_2
  --actor.gradient_checkpointing_enable
  --ckpt.output_dir ./checkpoint/tinyllama-ppo-dense
  --ckpt.path ./checkpoint/tinyllama-ppo-dense/ckpt
  --ckpt.save_steps -1
  --logger.logging_steps 1
)
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh" "$@"

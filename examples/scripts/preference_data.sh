# The preference data every stage that reads pairs shares (oracle DPO, DPO baseline, reward model, token scoring):
# UltraFeedback-binarized, chosen/rejected message lists through the chat template. One definition, because the
# ids score_tokens scores must be the ids the trainers see. Sourced by those scripts; override with arguments.
PREFERENCE_DATA=(
  --data.dataset HuggingFaceH4/ultrafeedback_binarized
  --data.dataset_split train_prefs
  --data.chosen_key chosen
  --data.rejected_key rejected
  --data.apply_chat_template
  --data.max_len 2048
)

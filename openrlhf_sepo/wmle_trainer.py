"""Reward-weighted MLE's trainer (the maths: ``wmle.py``; the data: ``wmle_data.py``).

How it rides on OpenRLHF's ``SFTTrainer`` without copying its ``fit`` loop. SFT batches are ``(input_ids,
attention_mask, loss_mask)``, the loss mask in shifted layout (entry t = 1 iff token t+1 is trained, as
``SFTDataset.get_loss_mask`` builds it), and the loss is ``SFTLoss`` = ``aggregate_loss(-logp, mask,
token_level_loss=True, batch_num_tokens=...)`` = sum(-logp * mask) / (sum of mask over the optimizer step's
micro-batches and all DP ranks; ``iter_grad_accum_global_norm``). ``WeightedSFTDataset`` puts w_t in the loss-mask
slot, float, summing to 1 per sequence, so that normaliser is the step's number of sequences and OpenRLHF's own
loop computes exactly mean_seq sum_t w_t * NLL_t, with gradient accumulation and data parallelism handled (tested
against a hand computation). What else reads the mask, checked:

- ``_optimizer_step_loss_norm``'s sequence count (rows with mask sum > 0) feeds only the per-sequence mode, unused.
- ``evaluate`` calls ``SFTLoss`` without the step normaliser: ``masked_mean(-logp, w)`` = sum(w * NLL) / sum(w),
  the batch's mean over sequences of the weighted NLL, i.e. the same objective. Kept as it is.
- ``zero_pad_sequences`` keeps the float dtype; padding is 0. ``--ds.packing_samples`` unpads by the attention
  mask and gathers the log-probs back to the padded layout, so the weights still line up.

So ``WeightedMLETrainer`` changes nothing in training; it only adds logs (per step, over all its micro-batches
and ranks): ``wmle_loss`` (the objective, exactly), ``nll`` (plain mean NLL over the weighted tokens, for
reference), ``weight_max`` and ``weight_entropy`` (how peaked the weights are), and the same under ``eval/``.
"""

import torch
from openrlhf.trainer.sft_trainer import SFTTrainer

from openrlhf_sepo import openrlhf_internals


class WeightedMLETrainer(SFTTrainer):
    """OpenRLHF's ``SFTTrainer`` on ``WeightedSFTDataset`` batches: same arguments, same ``fit``, ``evaluate``,
    checkpoints and loss (see the module docstring for why its loss is the weighted MLE). It adds logs only.

    Per optimizer step, summed over its micro-batches and all ranks (N sequences, w their weights):
        wmle_loss       sum_seq sum_t w_t * NLL_t / N       (the objective; OpenRLHF's gpt_loss is its last micro-batch)
        nll             mean NLL_t over the tokens with w_t > 0  (plain MLE's loss on the same tokens, for reference)
        weight_max      mean_seq max_t w_t                  (1 / N_tokens when uniform, 1 when one token takes all)
        weight_entropy  mean_seq -sum_t w_t log w_t         (log N_tokens when uniform, 0 when one token takes all)
    and the same four over the eval set under ``eval/``, next to OpenRLHF's ``eval gpt_loss``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_loss = self.loss_fn
        self.loss_fn = self._loss
        self._sums = torch.zeros(6, dtype=torch.float64)

    def _loss(self, per_token_logps, weights, **loss_batch_info):
        """OpenRLHF's ``SFTLoss``, unchanged; the sums behind the logs are recorded on the side."""
        with torch.no_grad():
            nll, w = -per_token_logps.detach().double(), weights.double()
            seqs, tokens = w.sum(-1) > 0, w > 0
            entropy = -(w * torch.where(tokens, w, 1.0).log()).sum(-1)  # 0 log 0 = 0
            self._sums += torch.stack([
                (w * nll).sum(), seqs.sum(), (nll * tokens).sum(), tokens.sum(),
                w.max(-1).values[seqs].sum(), entropy[seqs].sum(),
            ]).cpu()
        return self.sft_loss(per_token_logps, weights, **loss_batch_info)

    def _pop_metrics(self):
        """The recorded sums, summed over ranks (a collective: every rank calls it), as metrics; resets them."""
        sums = self.strategy.all_reduce(self._sums.clone(), op="sum").cpu()
        self._sums.zero_()
        loss_sum, seqs, nll_sum, tokens, max_sum, entropy_sum = sums.tolist()
        seqs, tokens = max(seqs, 1.0), max(tokens, 1.0)
        return {"wmle_loss": loss_sum / seqs, "nll": nll_sum / tokens, "weight_max": max_sum / seqs,
                "weight_entropy": entropy_sum / seqs}

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        """OpenRLHF's, with this step's metrics added to its logs."""
        logs_dict = openrlhf_internals.show_step_logs(step_bar, logs_dict, self._pop_metrics())
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

    def evaluate(self, eval_dataloader, steps=0):
        """OpenRLHF's (its ``eval gpt_loss`` is the weighted NLL, mean of batch means), then the metrics over the
        eval set, logged as ``eval/*``. The training sums are set aside meanwhile."""
        train_sums, self._sums = self._sums, torch.zeros_like(self._sums)
        super().evaluate(eval_dataloader, steps)
        metrics = self._pop_metrics()
        self._sums = train_sums
        openrlhf_internals.log_eval_metrics(self, metrics, steps)  # where OpenRLHF logs its own: wandb, else TensorBoard

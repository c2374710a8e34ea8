"""TKPO training on OpenRLHF 0.11's ``SFTTrainer``: L = CE(y | x) + lambda * L_TKPO (formulas in ``tkpo.py``).

How it overrides (as ``trainer.py`` does for SePO). ``SFTTrainer.fit`` and ``evaluate`` are loops that unpack
``(inputs, attention_mask, loss_mask)``, call ``self.model(inputs, attention_mask=..., return_logprobs=True, ...)``
and hand the log-probs and the shifted loss mask to ``self.loss_fn``. Both loops stay OpenRLHF's (token-level CE
normalisation over the accumulation window, logging, evaluation, checkpoints, resume); the hooks become TKPO's:

- batch: ``CounterfactualSFTDataset`` stacks (x, y) and (x', y) on a second dimension, [B, 2, T].
- model: ``TKPOActor``, OpenRLHF's ``Actor`` whose forward, given such a stack, runs (x', y) through the same DeepSpeed
  engine without gradient, keeps its logits, then runs (x, y) as ``Actor.forward`` does (with gradient) and keeps
  those logits too; what it returns is ``Actor.forward``'s result for (x, y), so OpenRLHF's CE is unchanged.
- loss: ``loss_fn`` is OpenRLHF's ``SFTLoss`` (the CE) plus lambda * ``TKPOLoss`` on the kept logits at the response
  positions of the loss mask, aligned by response offset: the response is the same ids at the end of both sequences
  (checked by the dataset), so response token j sits at the same distance from each sequence's end.
- logs: ``ce_loss``, ``tkpo_loss``, ``r_mean`` (mean top-1 Plackett-Luce probability of the gold token) and
  ``gold_rank`` (mean number of negatives the policy ranks above the gold token) join OpenRLHF's (``gpt_loss`` is the
  total, lr, grad_norm, loss_mean), in the logs and on the progress bar.
"""

import torch
from openrlhf.models import Actor, SFTLoss
from openrlhf.trainer.sft_trainer import SFTTrainer

from openrlhf_sepo.openrlhf_internals import show_step_logs
from openrlhf_sepo.tkpo import TKPOLoss


class TKPOActor(Actor):
    """OpenRLHF's ``Actor``; a [B, 2, T] input (row 0: (x, y), row 1: (x', y)) also runs (x', y) without gradient.

    After such a call, ``counterfactual`` holds ``(policy logits [B, T, V], counterfactual logits [B, T, V], the (x, y)
    ids [B, T], their attention [B, T], the counterfactual attention [B, T])`` for the trainer's loss. A [B, T] input is
    ``Actor``'s.
    """

    counterfactual = None

    def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False, **kwargs):
        if sequences.dim() != 3:
            return super().forward(sequences, action_mask, attention_mask, return_output=return_output, **kwargs)
        with torch.no_grad():
            cf_logits = super().forward(sequences[:, 1], attention_mask=attention_mask[:, 1], return_output=True)["logits"]
        result = super().forward(sequences[:, 0], action_mask, attention_mask[:, 0], return_output=True, **kwargs)
        output = result[1] if isinstance(result, tuple) else result
        self.counterfactual = (output["logits"], cf_logits, sequences[:, 0], attention_mask[:, 0], attention_mask[:, 1])
        if isinstance(result, tuple):
            return result if return_output else result[0]
        return result


def aligned_positions(loss_mask: torch.Tensor, attention: torch.Tensor, cf_attention: torch.Tensor):
    """Response positions of a TKPO batch, aligned by response offset.

    ``loss_mask`` [B, T-1] (entry t: token t + 1 is a response token), attention masks [B, T] of (x, y) and (x', y).
    Returns ``(policy_index, cf_index, mask)``, each [B, N] with N the longest response: position t of the policy
    logits and position t + (L' - L) of the counterfactual logits predict the same response token (L, L' the two
    sequence lengths: the response ends both). ``mask`` marks the real entries.
    """
    mask = loss_mask.bool()
    counts = mask.sum(1)
    width = max(int(counts.max()), 1)
    rows, cols = mask.nonzero(as_tuple=True)
    offset = torch.arange(len(rows), device=mask.device) - (torch.cumsum(counts, 0) - counts)[rows]
    policy_index = torch.zeros((mask.shape[0], width), dtype=torch.long, device=mask.device)
    policy_index[rows, offset] = cols
    shift = cf_attention.sum(1) - attention.sum(1)
    cf_index = (policy_index + shift.unsqueeze(1)).clamp(min=0)
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return policy_index, cf_index, valid


class TKPOTrainer(SFTTrainer):
    """OpenRLHF ``SFTTrainer`` training ``CE + lam * TKPOLoss`` (see the module docstring).

    Same arguments as ``SFTTrainer``, plus ``tkpo_loss`` (a ``TKPOLoss``), ``lam`` and ``seed`` (negatives are drawn
    from a generator seeded with seed, the rank and the call count: reproducible, different on every rank and step).
    ``model`` must be a ``TKPOActor`` prepared by the strategy.
    """

    def __init__(self, *args, tkpo_loss: TKPOLoss, lam: float = 0.5, seed: int = 42, **kwargs):
        super().__init__(*args, **kwargs)
        self.tkpo_loss, self.lam, self.seed = tkpo_loss, lam, seed
        self.sft_loss = SFTLoss()
        self.loss_fn = self._loss
        self._calls = 0
        self._step_logs = {}

    def _loss(self, per_token_log_probs, loss_mask, **loss_batch_info):
        ce = self.sft_loss(per_token_log_probs, loss_mask, **loss_batch_info)
        logits, cf_logits, ids, attention, cf_attention = self.model.counterfactual
        policy_index, cf_index, valid = aligned_positions(loss_mask, attention, cf_attention)
        labels = ids.gather(1, (policy_index + 1).clamp(max=ids.shape[1] - 1))  # position t predicts token t + 1
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(self.seed * 1_000_003 + self.strategy.get_rank() * 10_007 + self._calls)
        self._calls += 1
        tkpo, stats = self.tkpo_loss(logits, cf_logits, labels, policy_index, cf_index, valid, generator=generator)
        self._step_logs = {"ce_loss": ce.item(), **stats}
        return ce + self.lam * tkpo

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        """OpenRLHF's, with the last micro-batch's TKPO metrics (mean over ranks) in its logs and on the progress bar."""
        logs_dict = show_step_logs(step_bar, logs_dict, self.strategy.all_reduce(dict(self._step_logs)))
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

"""Token reward model training on OpenRLHF 0.11's ``RewardModelTrainer``: ListMLE over ranked lists.

How it overrides (as ``trainer.py`` does for SePO). ``RewardModelTrainer.fit`` and ``evaluate`` are monolithic
loops that unpack a 5-tuple batch, call ``concatenated_forward(model, chosen_ids, c_mask, reject_ids, r_mask)``
for ``(chosen_reward, reject_reward, aux_loss)``, then ``loss_fn(chosen_reward, reject_reward, margin)``, and log
``acc = mean(chosen_reward > reject_reward)``. Both loops stay OpenRLHF's (logging, evaluation, checkpoints,
resume, gradient accumulation); the hooks become the token reward model's:

- batch: ``RankedListDataset`` batches are ``(input_ids, attention_mask, response_mask, layout, ListBatch)``: whole
  lists, contiguous, best first; ``layout`` [N, 2] holds each response's list index and preference score.
- forward: one forward over every response of every list; token rewards ``r = act(head(h_t))`` at every
  position, the sequence scores e of the chosen aggregation over the response positions. It returns, for every
  pair (i, j) of one list with a strictly higher preference score for i, ``(e_i, e_j)``: so OpenRLHF's ``acc``
  (and ``eval`` ``acc_mean``) is the ranking accuracy, the share of ordered pairs the model orders right.
- loss: ListMLE over the lists, from the e of the same forward (kept on the trainer between the two calls;
  ``fit`` always calls ``loss_fn`` right after ``concatenated_forward``), not from the pairs.
- eval: OpenRLHF's evaluation (``eval_loss`` = ListMLE, ``acc_mean`` = ranking accuracy), plus Kendall's tau of
  each list's order by e against its order by preference, averaged over lists and ranks (``kendall_tau``).
- logs: the response tokens' mean and standard deviation of r (``token_reward_mean``, ``token_reward_std``) join
  OpenRLHF's train logs (loss, acc, chosen_reward, reject_reward, lr, grad_norm, loss_mean, acc_mean).
"""

import torch
from openrlhf.trainer.rm_trainer import RewardModelTrainer

from openrlhf_sepo.token_rm import aggregate, list_mle, token_rewards


def ordered_pairs(list_ids: torch.Tensor, preference: torch.Tensor):
    """(i, j) index tensors of every pair of responses of the same list with preference[i] > preference[j]."""
    same = list_ids.unsqueeze(1) == list_ids.unsqueeze(0)
    return (same & (preference.unsqueeze(1) > preference.unsqueeze(0))).nonzero(as_tuple=True)


def kendall_tau(scores: torch.Tensor, list_ids: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """Per list, (concordant - discordant) / ordered pairs: over the pairs with different preference scores, +1
    where e orders them as the preference does, -1 where it reverses them, 0 where e ties. [number of lists]."""
    i, j = ordered_pairs(list_ids, preference)
    sign = torch.sign(scores[i] - scores[j]).double()
    n_lists = int(list_ids.max()) + 1
    totals = torch.zeros(n_lists, dtype=torch.float64, device=scores.device).index_add_(0, list_ids[i], sign)
    counts = torch.bincount(list_ids[i], minlength=n_lists).double()
    return totals / counts


def _gather_uneven(gather, data: torch.Tensor) -> torch.Tensor:
    """``gather`` (a strategy's equal-size ``all_gather``, concatenating) for 1-D tensors of any size per rank."""
    sizes = gather(torch.tensor([float(data.numel())], device=data.device)).long().tolist()
    padded = torch.cat([data, data.new_zeros(max(sizes) - data.numel())])
    chunks = gather(padded).split(max(sizes))
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])


class TokenRewardModelTrainer(RewardModelTrainer):
    """OpenRLHF ``RewardModelTrainer`` training a token reward model with ListMLE (see the module docstring).

    Same arguments as ``RewardModelTrainer`` minus ``loss``, plus ``activation``, ``aggregation`` and ``tau``
    (``token_rm.py``). ``model`` is OpenRLHF's critic-type value-head model (``get_llm_for_sequence_regression(...,
    "critic")``) prepared by the strategy.
    """

    def __init__(self, model, strategy, optim, train_dataloader, eval_dataloader, scheduler, tokenizer,
                 activation="softplus", aggregation="avg", tau=2.0, max_norm=1.0, max_epochs=1,
                 save_hf_ckpt=False, disable_ds_ckpt=False):
        # RewardModelTrainer reads two pairwise-RM flags that train_token_rm does not have: neutral values.
        for name in ("margin_loss_enable", "compute_fp32_loss_enable"):
            if not hasattr(strategy.args.model, name):
                setattr(strategy.args.model, name, False)
        super().__init__(model, strategy, optim, train_dataloader, eval_dataloader, scheduler, tokenizer,
                         max_norm=max_norm, max_epochs=max_epochs, loss="sigmoid",
                         disable_ds_ckpt=disable_ds_ckpt, save_hf_ckpt=save_hf_ckpt)
        self.activation, self.aggregation, self.tau = activation, aggregation, tau
        self.loss_fn = self._loss
        self._forward = None  # (e, list_ids) of the last concatenated_forward, for _loss
        self._step_logs = {}
        self._tau_sum = self._tau_lists = 0.0

    def concatenated_forward(self, model, input_ids, attention_mask, response_mask, layout):
        """-> (e of the better response, e of the worse one, for every ordered pair; aux loss)."""
        list_ids, preference = layout[:, 0].long(), layout[:, 1]
        rewards = token_rewards(model, input_ids, attention_mask, self.activation)
        response_mask = response_mask.bool()
        scores = aggregate(rewards, response_mask, list_ids, self.aggregation, self.tau)
        self._forward = (scores, list_ids)
        picked = rewards.detach()[response_mask]
        self._step_logs = {"token_reward_mean": picked.mean().item(), "token_reward_std": picked.std().item()}
        if not getattr(model, "module", model).training:  # DeepSpeed's engine.eval() sets its module's flag only
            taus = kendall_tau(scores.detach(), list_ids, preference)
            self._tau_sum += taus.sum().item()
            self._tau_lists += len(taus)
        i, j = ordered_pairs(list_ids, preference)
        return scores[i], scores[j], []

    def _loss(self, better, worse, margin=None):
        """ListMLE of the last forward's lists (``better`` / ``worse`` serve OpenRLHF's accuracy and logs only)."""
        scores, list_ids = self._forward
        return list_mle(scores, list_ids)

    def evaluate(self, eval_dataloader, steps=0):
        """OpenRLHF's evaluation, plus the mean Kendall tau over the evaluation lists of every rank.

        OpenRLHF's evaluate all-gathers every returned reward for its statistics, which needs the same count on
        every rank; with lists, ranks see different numbers of ordered pairs, so the strategy's ``all_gather`` is
        made to accept uneven sizes for the duration of the call.
        """
        self._tau_sum = self._tau_lists = 0.0
        gather = self.strategy.all_gather
        self.strategy.all_gather = lambda data: _gather_uneven(gather, data)
        try:
            super().evaluate(eval_dataloader, steps)
        finally:
            del self.strategy.all_gather  # back to the class's method
        totals = self.strategy.all_reduce({"tau_sum": self._tau_sum, "lists": self._tau_lists}, op="sum")
        tau = totals["tau_sum"] / max(totals["lists"], 1)
        self.strategy.print(f"eval step {steps}: kendall_tau {tau:.4f} over {int(totals['lists'])} lists")
        if self.strategy.is_rank_0():
            if self._wandb is not None:
                self._wandb.log({"eval/kendall_tau": tau, "eval/global_step": steps})
            elif self._tensorboard is not None:
                self._tensorboard.add_scalar("eval/kendall_tau", tau, steps)

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        """OpenRLHF's, with the last micro-batch's token reward statistics (mean over ranks) in its logs."""
        logs_dict = {**(logs_dict or {}), **self.strategy.all_reduce(dict(self._step_logs))}
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

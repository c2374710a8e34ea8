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
  OpenRLHF's train logs (loss, acc, chosen_reward, reject_reward, lr, grad_norm, loss_mean, acc_mean) and its progress
  bar.
"""

import torch
from openrlhf.trainer.rm_trainer import RewardModelTrainer

from openrlhf_sepo.openrlhf_internals import (PAIRWISE_RM_FLAGS, add_missing_flags, engine_module, log_eval_metrics,
                                              show_step_logs, uneven_all_gather)
from openrlhf_sepo.token_rm import CONFIG_KEY, aggregate, list_mle, token_rewards
from openrlhf_sepo.training import enable_gradient_checkpointing


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
        add_missing_flags(strategy.args.model, PAIRWISE_RM_FLAGS)
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
        if not engine_module(model).training:  # DeepSpeed's engine.eval() sets its module's flag only
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
        with uneven_all_gather(self.strategy):
            super().evaluate(eval_dataloader, steps)
        totals = self.strategy.all_reduce({"tau_sum": self._tau_sum, "lists": self._tau_lists}, op="sum")
        tau = totals["tau_sum"] / max(totals["lists"], 1)
        self.strategy.print(f"eval step {steps}: kendall_tau {tau:.4f} over {int(totals['lists'])} lists")
        log_eval_metrics(self, {"kendall_tau": tau}, steps)

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        """OpenRLHF's, with the last micro-batch's token reward statistics (mean over ranks) in its logs and on the
        progress bar."""
        logs_dict = show_step_logs(step_bar, logs_dict, self.strategy.all_reduce(dict(self._step_logs)))
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)


def load_for_training(args, strategy):
    """(OpenRLHF's critic-type value-head model from ``--model.model_name_or_path``, its tokenizer), as ``train_rm``
    loads its model but with a value at every position.

    A ``train_token_rm`` checkpoint continues with its trained head (the on-policy loop retrains the token RM each
    round); any other causal LM gets a fresh head, near zero. The config records ``value_head_prefix`` and the
    ``--token_rm.*`` settings from the start, so that every HF save (``--ckpt.save_hf``, the final one) can be scored.
    """
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model.model_name_or_path, trust_remote_code=True)
    continuing = isinstance(getattr(config, CONFIG_KEY, None), dict)
    strategy.print(f"train_token_rm: {'continuing the token RM' if continuing else 'a new value head on'} "
                   f"{args.model.model_name_or_path}")
    model = get_llm_for_sequence_regression(
        args.model.model_name_or_path, "critic",
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        ds_config=strategy.get_ds_train_config(),
        init_value_head=not continuing,
        value_head_prefix=args.ds.value_head_prefix,
    )
    model.config.value_head_prefix = model.value_head_prefix  # the flag's, or a continued checkpoint's own
    setattr(model.config, CONFIG_KEY, {"activation": args.token_rm.activation,
                                       "aggregation": args.token_rm.aggregation, "tau": args.token_rm.tau})
    tokenizer = get_tokenizer(args.model.model_name_or_path, model, "right", strategy,
                              use_fast=not args.data.disable_fast_tokenizer)
    strategy.print(model)
    enable_gradient_checkpointing(model, args)
    return model, tokenizer

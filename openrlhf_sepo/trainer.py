"""SePO policy training on OpenRLHF 0.11's ``DPOTrainer``: selected key tokens only, no reference model.

How it overrides (the choice, and why). ``DPOTrainer.fit`` and ``evaluate`` are monolithic loops that unpack a
5-tuple batch, run ``concatenated_forward`` on the policy and then on ``self.ref_model``, and hand the four
results to ``self.loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected)``. Copying those loops
would fork OpenRLHF's logging, evaluation, checkpoint/resume and gradient-accumulation code, so this trainer
keeps both loops unchanged and makes their hooks SePO's:

- batch: ``TokenScoreDataset`` batches keep the 5-tuple; their 5th element (OpenRLHF's prompt lengths) is a
  ``KeyTokens`` that also carries the two selection masks (and, with ``--sepo.nll_skip_bad``, the chosen tokens the
  NLL term skips). With ``--sepo.selection confidence`` a plain OpenRLHF ``RewardDataset(is_dpo=True)`` batch (its
  5th element the prompt lengths) is read as well.
- forward: ``_get_batch_logps`` hands back the per-token log-probs [B, T-1] in place of their sum, so OpenRLHF's
  own ``concatenated_forward`` (one policy forward over chosen+rejected, aux loss, NLL over the chosen response)
  returns what SePO needs. For the reference slot, ``concatenated_forward`` returns the batch's selection masks:
  ``ref_model`` is ``NoReferenceModel``, which has no weights and is never called, so no reference forward runs.
- loss: ``loss_fn`` is ``SePOLoss(policy_chosen, policy_rejected, chosen_mask, rejected_mask)``, whose argument
  order matches DPOLoss's with the masks in the reference slots. Its rewards are ``beta * u``, so fit's ``acc``
  is ``u_w > u_l``.
- confidence selection (ConfPO, ``--sepo.selection confidence``): the reference slot returns every response token of
  both sides, and ``loss_fn`` selects among them from the step's own detached policy log-probs
  (``scoring.low_confidence_tokens``) before ``SePOLoss``: no scores, no extra forward.
- NLL without the chosen answer's bad tokens (``--sepo.nll_skip_bad``): the policy forward's NLL is recomputed from
  the same chosen log-probs over the response tokens the batch does not mark as skipped (``loss.kept_token_nll``).
- read positions only (default): SePO reads the policy's log-probs at the selected tokens alone, and OpenRLHF's
  NLL term (on by default in train_sepo) reads every chosen response token. So the policy forward is OpenRLHF's own
  ``concatenated_forward`` (its NLL definition and its aux loss unchanged) with the model call swapped for one that
  asks the model (through the DeepSpeed engine, as ``Actor.forward`` does) for its final hidden states and the logits
  of one position, then runs the LM head and log-softmax only there: the selected tokens of both sides, plus the
  chosen response when the NLL term is on; never the prompt, the padding or the unselected rejected tokens. At
  k = 0.3 on both sides that is 30% of the response positions without the NLL term, (1 + 0.3) / 2 = 65% with it,
  and no prompt position. The log-softmax's backward (``scoring.LabelLogProbs``) builds one logits-sized
  buffer where autograd's builds about four. ``--sepo.full_logits`` keeps OpenRLHF's ``Actor.forward`` (full
  logits); so does ``--ds.packing_samples``. Both paths give the same log-probs at the selected positions, the same
  NLL, loss and gradients (tested, fp32 and bf16).
- logs: ``save_logs_and_checkpoints`` adds the selected-token mean log-probs, their margin, the fraction of
  response tokens selected (both sides together and per side) and, with ``--sepo.nll_skip_bad``, the fraction of
  chosen response tokens the NLL term skipped to OpenRLHF's logs (loss, acc, chosen/reject_reward, lr, grad_norm,
  nll_loss).
"""

import torch
import torch.nn.functional as F
from openrlhf.trainer.dpo_trainer import DPOTrainer

from openrlhf_sepo.datasets import SELECTION_MODES, as_key_tokens
from openrlhf_sepo.loss import SePOLoss, kept_token_nll
from openrlhf_sepo.openrlhf_internals import DPO_LOSS_FLAGS, add_missing_flags, engine_module, show_step_logs
from openrlhf_sepo.scoring import LabelLogProbs, low_confidence_tokens


class NoReferenceModel:
    """Fills ``DPOTrainer``'s ``ref_model`` slot. No weights, no forward: ``fit`` only calls ``eval()`` on it,
    and ``SelectiveDPOTrainer.concatenated_forward`` answers for it with the batch's selection masks."""

    def eval(self):
        return self


class SelectiveDPOTrainer(DPOTrainer):
    """OpenRLHF ``DPOTrainer`` trained with ``SePOLoss(beta, gamma)`` on ``TokenScoreDataset`` batches.

    Same arguments as ``DPOTrainer`` minus ``ref_model``, plus ``gamma``, ``full_logits`` and ``selection`` (one of
    ``datasets.SELECTION_MODES``: ``confidence`` selects in each step, ConfPO's rule; the others use the batch's
    masks). Everything but the batch unpacking, the per-token forward and the loss is OpenRLHF's (see the module
    docstring).
    """

    def __init__(
        self,
        model,
        strategy,
        tokenizer,
        optim,
        train_dataloader,
        eval_dataloader,
        scheduler,
        max_norm=0.5,
        beta=1.0,
        gamma=0.0,
        full_logits: bool = False,
        selection: str = "per_response",
        max_epochs: int = 2,
        save_hf_ckpt: bool = False,
        disable_ds_ckpt: bool = False,
    ) -> None:
        # DPOTrainer.__init__ builds a DPOLoss from two DPO-only flags, which train_sepo does not have;
        # neutral values let it do so, and the DPOLoss is replaced right below.
        add_missing_flags(strategy.args.model, DPO_LOSS_FLAGS)
        super().__init__(
            model, NoReferenceModel(), strategy, tokenizer, optim, train_dataloader, eval_dataloader, scheduler,
            max_norm=max_norm, beta=beta, max_epochs=max_epochs, save_hf_ckpt=save_hf_ckpt,
            disable_ds_ckpt=disable_ds_ckpt,
        )
        if selection not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {SELECTION_MODES}, got {selection!r}")
        self.gamma = gamma
        self.confidence = selection == "confidence"
        self.selected_positions_only = not (full_logits or self.packing_samples)
        self.sepo_loss = SePOLoss(beta, gamma)
        self.loss_fn = self._loss
        self._step_logs = {}

    def _loss(self, chosen_logps, rejected_logps, chosen_mask, rejected_mask):
        """``SePOLoss`` on the selected tokens, recording the batch's selected-token mean log-probs and selected
        shares for the logs. With the confidence selection the masks are the response tokens (the reference slot's),
        and the selection among them is ``low_confidence_tokens`` of the detached log-probs of this very step."""
        if self.confidence:
            chosen_mask = low_confidence_tokens(chosen_logps, chosen_mask)
            rejected_mask = low_confidence_tokens(rejected_logps, rejected_mask)
        loss, chosen_reward, rejected_reward = self.sepo_loss(chosen_logps, rejected_logps, chosen_mask, rejected_mask)
        chosen_u, rejected_u = chosen_reward / self.beta, rejected_reward / self.beta
        chosen_n, rejected_n = chosen_mask.sum(), rejected_mask.sum()
        chosen_total, rejected_total = self._response_tokens
        self._step_logs.update(
            chosen_logps=chosen_u.mean().item(),
            rejected_logps=rejected_u.mean().item(),
            margin=(chosen_u - rejected_u).mean().item(),
            selected_frac=((chosen_n + rejected_n) / (chosen_total + rejected_total)).item(),
            chosen_selected_frac=(chosen_n / chosen_total).item(),
            rejected_selected_frac=(rejected_n / rejected_total).item(),
        )
        return loss, chosen_reward, rejected_reward

    def concatenated_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, key_tokens):
        """Policy: OpenRLHF's forward -> (chosen [B, T-1], rejected [B, T-1] per-token log-probs, aux, nll), the NLL
        over the kept chosen tokens when the batch marks some as skipped (``--sepo.nll_skip_bad``).
        Reference slot: (chosen selection mask, rejected selection mask, None, None), padded to T-1; no forward. With
        the confidence selection the two masks are every response token, among which ``_loss`` selects.
        ``key_tokens``: a ``KeyTokens``, or OpenRLHF ``RewardDataset``'s prompt lengths (``as_key_tokens``)."""
        key_tokens = as_key_tokens(key_tokens)
        if model is not self.ref_model:
            if self.selected_positions_only:
                chosen, rejected, aux_loss, nll = self._selected_forward(
                    model, chosen_ids, c_mask, reject_ids, r_mask, key_tokens)
            else:
                chosen, rejected, aux_loss, nll = super().concatenated_forward(
                    model, chosen_ids, c_mask, reject_ids, r_mask, key_tokens.prompt_id_lens)
            if self.nll_loss and key_tokens.chosen_nll_skip is not None:
                nll = self._kept_nll(chosen, c_mask, key_tokens)
            return chosen, rejected, aux_loss, nll
        width = max(chosen_ids.shape[1], reject_ids.shape[1]) - 1
        # response tokens per side (attended, past the prompt), as OpenRLHF's _get_batch_logps counts them
        chosen_response = self._response_positions(c_mask, key_tokens.prompt_id_lens, width)
        rejected_response = self._response_positions(r_mask, key_tokens.prompt_id_lens, width)
        self._response_tokens = (chosen_response.sum(), rejected_response.sum())
        if self.confidence:
            return chosen_response, rejected_response, None, None
        if key_tokens.chosen_mask is None:
            raise ValueError("a batch without selection masks (OpenRLHF's RewardDataset) needs --sepo.selection "
                             "confidence; the other selections read them from a scores dir (TokenScoreDataset)")
        chosen_sel = F.pad(key_tokens.chosen_mask, (0, width - key_tokens.chosen_mask.shape[1])).to(chosen_ids.device)
        rejected_sel = F.pad(key_tokens.rejected_mask, (0, width - key_tokens.rejected_mask.shape[1])).to(chosen_ids.device)
        return chosen_sel, rejected_sel, None, None

    def _kept_nll(self, chosen_logps, c_mask, key_tokens):
        """``kept_token_nll`` of the chosen per-token log-probs [B, T-1] over the response tokens the batch does not
        mark in ``chosen_nll_skip``; records the share of chosen response tokens skipped for the logs."""
        width = chosen_logps.shape[1]
        response = self._response_positions(c_mask, key_tokens.prompt_id_lens, width)
        skip = F.pad(key_tokens.chosen_nll_skip, (0, width - key_tokens.chosen_nll_skip.shape[1])).to(response.device)
        skipped = response & skip.bool()
        self._step_logs["nll_skipped_frac"] = (skipped.sum() / response.sum()).item()
        return kept_token_nll(chosen_logps, response & ~skipped)

    def _selected_forward(self, model, chosen_ids, c_mask, reject_ids, r_mask, key_tokens):
        """OpenRLHF's ``concatenated_forward`` (its concatenation, split, aux loss and NLL), with its model call
        replaced by ``_logps_at``: the LM head and log-softmax run only where a log-prob is read, the selected
        tokens and, with the NLL term on, every chosen response token. Other entries of the per-token log-probs
        are 0: ``SePOLoss`` reads the selected ones only, and OpenRLHF's NLL the chosen response only.

        With the confidence selection the reference slot's masks are every response token of both sides: the
        selection is made from all of them after this forward, so the LM head runs at the whole response of both
        sides (still never at the prompt or the padding), not at a subset of the rejected tokens.
        """
        chosen_sel, rejected_sel, _, _ = self.concatenated_forward(
            self.ref_model, chosen_ids, c_mask, reject_ids, r_mask, key_tokens
        )
        selected = torch.cat([chosen_sel, rejected_sel]).bool()
        if self.nll_loss:
            chosen_response = self._response_positions(c_mask, key_tokens.prompt_id_lens, selected.shape[1])
            selected[: chosen_ids.shape[0]] |= chosen_response

        def forward(ids, attention_mask, **_):  # what concatenated_forward calls as model(ids, attention_mask=...)
            return self._logps_at(model, ids, attention_mask, selected)

        chosen, rejected, aux_loss, nll = super().concatenated_forward(
            forward, chosen_ids, c_mask, reject_ids, r_mask, key_tokens.prompt_id_lens
        )
        return chosen, rejected, aux_loss, nll if self.nll_loss else 0

    @staticmethod
    def _response_positions(c_mask, prompt_id_lens, width):
        """[B, width] bool, log-prob layout: entry t is True iff ids[t+1] is an attended token past the prompt:
        the tokens whose mean log-prob is OpenRLHF's NLL (``_get_batch_logps``' mask; tested against it)."""
        attended = F.pad(c_mask, (0, width + 1 - c_mask.shape[1]))[:, 1:].bool()
        predicted = torch.arange(1, width + 1, device=c_mask.device)  # index of the token each position predicts
        return attended & (predicted >= torch.as_tensor(prompt_id_lens, device=c_mask.device).unsqueeze(1))

    def _logps_at(self, model, ids, att, selected):
        """(log-probs [B, T-1], the model's output) with the LM head and log-softmax run at ``selected`` only, the
        other entries 0.

        Position ids as ``Actor.forward`` builds them; ``hidden_states[-1]`` is the final, normed hidden state that
        the LM head reads, and ``logits_to_keep=1`` keeps the model from computing the other logits.
        """
        position_ids = att.long().cumsum(-1) - 1
        position_ids.masked_fill_(att == 0, 1)
        output = model.model(ids, attention_mask=att, position_ids=position_ids, output_hidden_states=True,
                             logits_to_keep=1)
        lm_head = engine_module(model.model).get_output_embeddings()  # the HF model's
        logits = lm_head(output.hidden_states[-1][:, :-1][selected])  # [selected tokens, V]
        logps = LabelLogProbs.apply(logits, ids[:, 1:][selected])
        full = torch.zeros(selected.shape, dtype=logps.dtype, device=logps.device).masked_scatter(selected, logps)
        return full, output

    def _get_batch_logps(self, per_token_logps, attention_mask, prompt_id_lens):
        """(per-token log-probs [B, T-1], mean over response tokens [B]): the per-token tensor in the sum's place,
        so OpenRLHF's ``concatenated_forward`` returns it; the mean still feeds ``--model.nll_loss_coef``."""
        _, means = super()._get_batch_logps(per_token_logps, attention_mask, prompt_id_lens)
        return per_token_logps, means

    def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None, client_states=None):
        """OpenRLHF's, with the last micro-batch's SePO metrics (mean over ranks) added to its logs."""
        logs_dict = show_step_logs(step_bar, logs_dict, self.strategy.all_reduce(dict(self._step_logs)))
        super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)

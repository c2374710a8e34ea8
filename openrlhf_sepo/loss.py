"""SePO's reference-free contrastive loss over selected key tokens (SePO step 5)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SePOLoss(nn.Module):
    """Selective Preference Optimization loss.

    For each pair, with S_w / S_l the selected key tokens of the chosen / rejected response::

        u(y, S) = sum_{t in S} log pi_theta(y_t | x, y_<t) / |S|
        loss    = mean_batch( -log sigmoid( beta * (u(y_w, S_w) - u(y_l, S_l)) - gamma ) )

    No reference model. With every response token selected this is SimPO's length-normalised loss.

    ``forward(chosen_logps, rejected_logps, chosen_mask, rejected_mask) -> (loss, chosen_reward, rejected_reward)``:
    the inputs are [B, T-1] in the layout of OpenRLHF ``Actor(..., return_logprobs=True)`` (position t holds
    log p(ids[t+1])); the masks are 0/1 (or bool) of the same shape, 1 on the selected tokens. The rewards
    are ``beta * u`` per row, detached. A row with an empty mask raises ``ValueError`` (never a NaN).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 0.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"SePOLoss beta must be > 0, got {beta}")
        self.beta = beta
        self.gamma = gamma

    @staticmethod
    def selected_mean(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """u = sum(logps * mask) / sum(mask) per row, [B]; gradient reaches the selected positions only.

        ``torch.where`` rather than a product: an unselected -inf log-prob (e.g. a padded position) would
        turn ``-inf * 0`` into NaN.
        """
        if logps.shape != mask.shape:
            raise ValueError(f"log-probs {tuple(logps.shape)} and selection mask {tuple(mask.shape)} differ in shape")
        mask = mask.bool()
        counts = mask.sum(-1)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"SePOLoss: batch rows {empty} have no selected token (empty selection mask)")
        return torch.where(mask, logps, torch.zeros_like(logps)).sum(-1) / counts

    def forward(self, chosen_logps, rejected_logps, chosen_mask, rejected_mask):
        chosen_u = self.selected_mean(chosen_logps, chosen_mask)
        rejected_u = self.selected_mean(rejected_logps, rejected_mask)
        logits = self.beta * (chosen_u - rejected_u) - self.gamma
        loss = -F.logsigmoid(logits).mean()
        return loss, (self.beta * chosen_u).detach(), (self.beta * rejected_u).detach()


def kept_token_nll(logps: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The NLL term over the kept tokens of each chosen response (``--sepo.nll_skip_bad``)::

        NLL = -(1 / |B'|) * sum_{i in B'} (1 / |K_i|) * sum_{t in K_i} log pi_theta(y_t | x, y_<t)

    with K_i the kept tokens of row i (``keep``: its response tokens minus the skipped ones) and B' the rows with at
    least one kept token. With every response token kept it is OpenRLHF's DPO NLL term (the batch mean of each chosen
    response's mean log-prob, negated). A row with nothing kept is left out of the mean; with no kept token in the
    batch the term is 0 (a zero that still belongs to the graph, so backward runs).

    ``logps`` [B, T] per-token log-probs (log-prob layout), ``keep`` [B, T] bool / 0-1 of the same shape -> scalar.
    ``torch.where``, not a product, so an unkept -inf cannot make the term NaN.
    """
    if logps.shape != keep.shape:
        raise ValueError(f"log-probs {tuple(logps.shape)} and kept-token mask {tuple(keep.shape)} differ in shape")
    keep = keep.bool()
    counts = keep.sum(-1)
    rows = counts > 0
    sums = torch.where(keep, logps, torch.zeros_like(logps)).sum(-1)
    if not rows.any():
        return sums.sum() * 0.0
    return -(sums[rows] / counts[rows]).mean()

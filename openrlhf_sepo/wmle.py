"""Reward-weighted MLE (preference-grounded token-level guidance, Yang et al., NeurIPS 2023, arXiv 2306.00398):
train the LM on reference responses y, each token's NLL weighted by its normalised token reward.

    w_t = g_t / sum_{t'} g_{t'}              over the response's tokens
    L   = mean over sequences of  sum_t w_t * (-log pi(y_t | x, y_<t))

``token_weights`` gives w (its docstring has g). The token rewards are those of a ``score_tokens`` scores dir
(``--scorer token_rm``: a learned token RM's rewards in (0, 1.31); ``oracle_ref``: DPO log-ratios of any sign), read
by ``WeightedSFTDataset`` for one side (the chosen or the rejected responses).

The data set (``wmle_data.WeightedSFTDataset``) and the trainer (``wmle_trainer.WeightedMLETrainer``, which says
how the objective rides on OpenRLHF's ``SFTTrainer``) have their own modules; both names are re-exported here.
"""

import importlib

import torch

from openrlhf_sepo.scores_dir import ScoreDataError, padded_chunks

WEIGHTS = ("reward", "exp")
SIDES = ("chosen", "rejected")
# The data set and the trainer, re-exported under their old home (lazily: the maths stays light to import, and
# wmle_data, which imports the maths, is not imported back from here).
_MOVED = {"WeightedSFTDataset": "openrlhf_sepo.wmle_data", "WeightedMLETrainer": "openrlhf_sepo.wmle_trainer"}


def token_weights(rewards, kind: str = "reward", reward_to_go: bool = False, lengths=None) -> torch.Tensor:
    """Normalised token weights of one response, or of several concatenated ones.

    ``rewards``: 1-D, the token rewards r_t of one response, or with ``lengths`` (one int per response) the
    concatenation of ``len(lengths)`` responses' rewards. Returns float64 weights of the same shape, each
    response's summing to 1:

        r'_t = sum_{t' >= t} r_{t'}    with reward_to_go, else r_t
        g_t  = r'_t                    kind "reward": needs every r_t >= 0 and sum_t r_t > 0 (so r' >= 0, sum > 0)
        g_t  = exp(r'_t - max r')      kind "exp": any finite r; the max cancels in the normalisation
        w_t  = g_t / sum_{t'} g_{t'}

    A response whose weights cannot be formed (empty, a NaN/inf reward, or with ``reward`` a negative reward or
    a zero sum) is a ``ScoreDataError`` naming it (``row i``: its place among the responses) and, for the sign,
    the way out (``--wmle.weight exp``). Never NaN.
    """
    if kind not in WEIGHTS:
        raise ScoreDataError(f"--wmle.weight must be one of {WEIGHTS}, got {kind!r}")
    flat = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    lengths = torch.tensor([flat.numel()]) if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
    if int(lengths.sum()) != flat.numel():
        raise ValueError(f"lengths sum to {int(lengths.sum())}, but there are {flat.numel()} rewards")
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    problems = [(lengths < 1, "has no response token")]
    problems.append((torch.zeros(len(lengths), dtype=torch.bool).index_fill(0, rows[~flat.isfinite()], True),
                     "has a NaN or infinite reward"))
    if kind == "reward":
        negative = torch.zeros(len(lengths), dtype=torch.bool).index_fill(0, rows[flat < 0], True)
        total = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, rows, flat)
        problems += [
            (negative, "has a negative token reward, which --wmle.weight reward cannot weight (it needs r_t >= 0); "
                       "use --wmle.weight exp, which takes rewards of any sign"),
            (~negative & (total <= 0), "has token rewards summing to 0, which --wmle.weight reward cannot normalise; "
                                       "use --wmle.weight exp"),
        ]
    for bad, what in problems:
        if bad.any():
            named = ", ".join(f"row {r}" for r in torch.nonzero(bad).flatten()[:5].tolist())
            raise ScoreDataError(f"{int(bad.sum())} response(s) {what}: {named}{' ...' if bad.sum() > 5 else ''}")

    # Right-pad a chunk of responses to [n, W]: reward-to-go is then a reversed cumsum along the row (exact per
    # row, where a cumsum over the flat data would cancel across rows), and max / sum are row reductions.
    weights = torch.empty_like(flat)
    for chunk in padded_chunks(flat, lengths):
        r = chunk.padded
        if reward_to_go:
            r = r.flip(-1).cumsum(-1).flip(-1)  # the padding is 0 and on the right: it adds nothing
        valid = torch.zeros_like(r, dtype=torch.bool)
        valid[chunk.at] = True
        if kind == "exp":
            r = r.masked_fill(~valid, float("-inf"))
            g = torch.exp(r - r.max(-1, keepdim=True).values)  # the row max gives exp(0) = 1: sum >= 1
        else:
            g = r
        weights[chunk.tokens] = (g / g.sum(-1, keepdim=True))[chunk.at]
    return weights


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'openrlhf_sepo.wmle' has no attribute {name!r}")

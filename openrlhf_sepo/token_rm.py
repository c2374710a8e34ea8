"""A token-level reward model learned from ranked lists (preference-grounded token-level guidance, Yang et al.,
NeurIPS 2023, arXiv 2306.00398): its model, sequence aggregations and ListMLE loss.

Model: OpenRLHF's value-head model that reads every position (``get_llm_for_sequence_regression(path,
"critic")``), its head initialised near zero (N(0, 1/(H+1)), as OpenRLHF's ``init_value_head``). The token reward
of the response token at absolute position t is read from the hidden state that has seen it:

    z_t = head(h_t),   r_t = act(z_t)
    act = softplus:  r = softplus(1 - softplus(1 - z))   (range (0, softplus(1)) = (0, 1.313); r(0) = 0.549)
    act = sigmoid:   r = sigmoid(z)                      (range (0, 1))

Sequence score of response k of a list of K (L_k its response tokens, Lbar = mean_k L_k, a constant):

    avg      e_k = Lbar * mean_t r_t
    sum      e_k = sum_t r_t
    softmax  e_k = Lbar * tau * logsumexp_t(r_t / tau)      (a soft maximum)
    softmin  e_k = -Lbar * tau * logsumexp_t(-r_t / tau)    (a soft minimum)

Loss (ListMLE, the Plackett-Luce likelihood of the preferred order): with the list sorted best first,
``sum_k [logsumexp_{j >= k} e_(j) - e_(k)]``, mean over lists. For K = 2 it is Bradley-Terry,
``-log sigmoid(e_chosen - e_rejected)``.

A batch holds whole lists, each contiguous and sorted best first (``token_rm_data.RankedListDataset`` breaks
preference ties at random, seeded); ``list_ids`` [N] says which list each response belongs to.
"""

import torch
import torch.nn.functional as F

from openrlhf_sepo.openrlhf_internals import engine_module

ACTIVATIONS = ("softplus", "sigmoid")
AGGREGATIONS = ("avg", "sum", "softmax", "softmin")
# Written into the saved model's config, so that a scorer reads the rewards with the activation they were trained with.
CONFIG_KEY = "token_rm"


def activation(z: torch.Tensor, kind: str) -> torch.Tensor:
    """The bounded token reward r = act(z) (see the module docstring)."""
    if kind == "softplus":
        return F.softplus(1.0 - F.softplus(1.0 - z))
    if kind == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"token reward activation must be one of {ACTIVATIONS}, got {kind!r}")


def list_mean_lengths(lengths: torch.Tensor, list_ids: torch.Tensor) -> torch.Tensor:
    """Lbar per response: the mean response length over the response's list, [N] float (no gradient)."""
    n_lists = int(list_ids.max()) + 1
    totals = torch.zeros(n_lists, dtype=torch.float64, device=lengths.device).index_add_(0, list_ids, lengths.double())
    counts = torch.bincount(list_ids, minlength=n_lists).double()
    return (totals / counts)[list_ids].float()


def aggregate(rewards: torch.Tensor, mask: torch.Tensor, list_ids: torch.Tensor, kind: str, tau: float = 2.0):
    """Sequence scores e [N] from token rewards ``rewards`` [N, T] at the positions where ``mask`` [N, T] is True.

    ``list_ids`` [N] (long): the list of each response, for Lbar. Every row needs at least one masked position.
    """
    if kind not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {kind!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    mask = mask.bool()
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"rows {(lengths == 0).nonzero().flatten().tolist()} have no response token")
    rewards = rewards.float()
    if kind == "sum":
        return torch.where(mask, rewards, 0.0).sum(-1)
    lbar = list_mean_lengths(lengths, list_ids)
    if kind == "avg":
        return lbar * torch.where(mask, rewards, 0.0).sum(-1) / lengths
    sign = 1.0 if kind == "softmax" else -1.0
    soft = tau * torch.logsumexp(torch.where(mask, sign * rewards / tau, float("-inf")), dim=-1)
    return sign * lbar * soft


def list_mle(scores: torch.Tensor, list_ids: torch.Tensor) -> torch.Tensor:
    """ListMLE over lists stored contiguously and sorted best first: mean over lists of
    ``sum_k [logsumexp_{j >= k} e_(j) - e_(k)]``. ``scores`` [N] (the e_k), ``list_ids`` [N] non-decreasing."""
    n_lists = int(list_ids.max()) + 1
    sizes = torch.bincount(list_ids, minlength=n_lists)
    if (sizes < 2).any():
        raise ValueError(f"lists {(sizes < 2).nonzero().flatten().tolist()} have fewer than 2 responses")
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(len(scores), device=scores.device) - starts[list_ids]
    padded = torch.full((n_lists, int(sizes.max())), float("-inf"), dtype=torch.float32, device=scores.device)
    padded = padded.index_put((list_ids, position), scores.float())
    # logsumexp over j >= k: a reversed cumulative logsumexp; padding (-inf) adds nothing.
    tail = torch.logcumsumexp(padded.flip(-1), dim=-1).flip(-1)
    terms = tail[list_ids, position] - scores.float()
    return torch.zeros(n_lists, device=scores.device).index_add_(0, list_ids, terms).mean()


def token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """r [B, T] (fp32): the token reward at every position of a right-padded batch (padding columns: garbage).

    ``model``: OpenRLHF's critic-type model from ``get_llm_for_sequence_regression`` (or the DeepSpeed engine that
    wraps it). It is called without an action mask, so it returns its backbone's output; the value head is then
    applied at every position, the last one (EOS) included, which OpenRLHF's critic forward drops.
    """
    output = model(input_ids, attention_mask=attention_mask, return_output=True)
    inner = engine_module(model)  # the HF model with the head
    head = getattr(inner, inner.value_head_prefix)
    return activation(head(output["last_hidden_state"]).squeeze(-1).float(), kind)


def checkpoint_settings(config: dict, path: str) -> dict:
    """The ``{"activation", "aggregation", "tau"}`` a ``train_token_rm`` checkpoint was trained with, from its config
    (a dict, as ``config.json`` holds it); ``ValueError`` naming ``path`` if it is not such a checkpoint."""
    settings = config.get(CONFIG_KEY)
    if not isinstance(settings, dict) or settings.get("activation") not in ACTIVATIONS:
        raise ValueError(f"{path!r} is not a train_token_rm checkpoint: its config.json has no '{CONFIG_KEY}' entry "
                         f"with an activation in {ACTIVATIONS} (got {settings!r})")
    return settings


def load_token_rm(path: str, param_dtype: str = "bf16", attn_implementation: str = "sdpa", **kwargs):
    """(model, settings) (``param_dtype``: bf16, fp16 or fp32) of a ``train_token_rm`` HF checkpoint: OpenRLHF's critic-type model with its value head,
    and the ``{"activation", "aggregation", "tau"}`` it was trained with (from its config)."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoConfig

    settings = checkpoint_settings(AutoConfig.from_pretrained(path, trust_remote_code=True).to_dict(), path)
    # OpenRLHF loads in bf16 or fp16 only; fp32 (scoring on a CPU) upcasts bf16 weights, which is lossless for the
    # bf16 checkpoints train_token_rm saves (a checkpoint saved in fp32 elsewhere would be rounded to bf16 first).
    model = get_llm_for_sequence_regression(path, "critic", param_dtype="bf16" if param_dtype == "fp32" else param_dtype,
                                            attn_implementation=attn_implementation, **kwargs)
    return (model.float() if param_dtype == "fp32" else model), settings

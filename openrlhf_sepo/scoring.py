"""Token-level reward estimation and key-token selection (SePO steps 3 and 4).

Token reward of response token y_t (DPO's implicit reward, beta dropped since it does not change a ranking):

    r(y_t) = log pi_oracle(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)

Selection, per response of N scored tokens and ratio k in (0, 1]:

    n = max(1, floor(k * N));  chosen keeps the n highest r, rejected the n lowest; ties -> earlier position.

With an eligibility mask (``TokenScoreDataset`` makes a pair's common response prefix ineligible), N counts the
eligible tokens and only they can be selected.

Two more rules on a response's tokens live here: ``low_confidence_tokens`` (ConfPO's selection from the policy's own
probabilities, made in the training step, no scores) and ``bad_key_tokens`` (the chosen tokens that
``--sepo.nll_skip_bad`` leaves out of the NLL term).
"""

import functools
import hashlib
import json
import math
import weakref

import torch


def num_selected(length, k: float):
    """n = max(1, floor(k * N)) for N >= 1, and 0 for an empty response. Works on ints and int tensors.

    A small epsilon absorbs float error (0.3 * 10 = 2.9999999999999996 must give 3, not 2).
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"selection ratio k must be in (0, 1], got {k}")
    if isinstance(length, torch.Tensor):
        n = torch.floor(length.double() * k + 1e-9).long().clamp(min=1)
        return torch.where(length > 0, n, torch.zeros_like(n))
    return 0 if length <= 0 else max(1, math.floor(length * k + 1e-9))


def select_key_tokens(
    scores: torch.Tensor, k: float, largest: bool, lengths: torch.Tensor = None, eligible: torch.Tensor = None
) -> torch.Tensor:
    """Vectorised key-token selection over a right-padded batch of token scores.

    Args:
        scores: [B, N] float, one score per response token; positions >= lengths[i] are padding (ignored).
            A 1-D tensor is treated as one response.
        k: selection ratio in (0, 1].
        largest: True for a chosen response (keep the highest scores), False for a rejected one (the lowest).
        lengths: [B] number of real tokens per row; default: all N.
        eligible: optional bool mask of ``scores``' shape; when given, only real tokens where it is True can be
            selected, and the count is computed from them: ``max(1, floor(k * E_i))`` with E_i the number of
            eligible real tokens of row i (0 when E_i = 0). Default: every real token is eligible.

    Returns:
        bool mask of the same shape as ``scores``: exactly ``max(1, floor(k * lengths[i]))`` True entries in
        row i (0 for an empty row), on the most extreme scores, ties broken by position (earlier wins).
        Deterministic; never empty for a non-empty row (with ``eligible``: for a row with an eligible token).
    """
    squeeze = scores.dim() == 1
    if squeeze:
        scores = scores.unsqueeze(0)
    batch, width = scores.shape
    positions = torch.arange(width, device=scores.device)
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.long, device=scores.device)
    lengths = lengths.to(scores.device)
    valid = positions.unsqueeze(0) < lengths.unsqueeze(1)
    if torch.isnan(scores[valid]).any():
        raise ValueError("token scores contain NaN; cannot select key tokens")
    counts = lengths
    if eligible is not None:
        eligible = eligible.to(scores.device).reshape(batch, width)
        valid = valid & eligible
        counts = valid.sum(1)

    mask = key_token_ranks(scores, largest, valid, interleaved=eligible is not None) < num_selected(counts, k).unsqueeze(1)
    return mask.squeeze(0) if squeeze else mask


def low_confidence_tokens(logps: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """ConfPO's critical tokens (Yoon et al., ICML 2025, arXiv 2506.08712): per response, the tokens to which the
    policy gives less than the mean of its token probabilities on that response.

    For row i with eligible (response) positions R_i and p_t = exp(logps[i, t])::

        tau_i = (1 / |R_i|) * sum_{t in R_i} p_t          (the arithmetic mean of the probabilities, not of the logs)
        S_i   = { t in R_i : p_t < tau_i }                 (strictly below: a token at exactly tau_i is not selected)
        S_i   = R_i  if that set is empty                  (all p_t equal, e.g. a one-token response)

    Source: the paper defines a preference-critical token as one whose probability under the training policy lies
    below a threshold set per response from the policy's own probabilities; the threshold tau_i (the mean of the
    probabilities, not of the log-probs) and the strict comparison are read from the authors' released code
    (``cpo_loss_confpo`` in github.com/hee-suk-yoon/ConfPO, which compares each log-prob with the log of the mean
    probability over the response's tokens, the prompt and padding masked out). The fallback is ours: the released
    code drops a pair whose selection is empty on either side from the loss; here such a response keeps all its
    tokens, so SePOLoss never sees an empty selection (that response then counts as in SimPO). The rule has no
    ratio k: the number of tokens selected varies by response and by step.

    Args:
        logps: [B, T] per-token log-probs of the current policy (detached here: the selection carries no gradient).
        eligible: [B, T] bool (or 0/1), True at the response tokens; other entries are never selected and do not
            enter the mean.
    Returns:
        [B, T] bool mask. Tokens with equal probability are all selected or all not (no tie-breaking is needed);
        the mean and the comparison are in float64, so the mask is a deterministic function of the inputs.
    """
    if logps.shape != eligible.shape:
        raise ValueError(f"log-probs {tuple(logps.shape)} and eligibility mask {tuple(eligible.shape)} differ in shape")
    eligible = eligible.bool()
    probs = torch.where(eligible, logps.detach().double().exp(), torch.zeros((), dtype=torch.float64,
                                                                             device=logps.device))
    tau = probs.sum(-1, keepdim=True) / eligible.sum(-1, keepdim=True).clamp(min=1)
    selected = eligible & (probs < tau)
    return torch.where(selected.any(-1, keepdim=True), selected, eligible)


def bad_key_tokens(scores: torch.Tensor, k: float, lengths: torch.Tensor = None) -> torch.Tensor:
    """The tokens ``--sepo.nll_skip_bad`` leaves out of the NLL term of a chosen response: those among its
    bottom-k share of scores that also score below zero::

        B = lowest_n(r) & { t : r_t < 0 },   n = max(1, floor(k * N))

    where ``lowest_n`` is ``select_key_tokens(scores, k, largest=False, lengths)``, the rule that picks a rejected
    response's key tokens (ties to the earlier position), and N the response's number of tokens. A response with no
    negative score loses nothing. Same shapes as ``select_key_tokens``: [B, N] (or 1-D) scores, positions
    >= lengths[i] are padding and never selected; returns a bool mask of the scores' shape.
    """
    return select_key_tokens(scores, k, largest=False, lengths=lengths) & (scores < 0)


def key_token_ranks(scores: torch.Tensor, largest: bool, valid: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """[B, N] long: each position's place in its row's selection order (0 = selected first), ties by position,
    positions where ``valid`` [B, N] is False after every valid one (``interleaved``: they may come before valid
    ones, as ineligible tokens do; otherwise they are right padding). Row i's first n ranks are its n key tokens,
    so one ranking serves every k: ``select_key_tokens`` compares it with ``num_selected``."""
    batch, width = scores.shape
    positions = torch.arange(width, device=scores.device)
    key = scores.double() if largest is False else -scores.double()
    key = key.masked_fill(~valid, math.inf)  # padding (and ineligible tokens) sort after every real token
    order = torch.sort(key, dim=1, stable=True).indices  # stable: equal scores keep position order
    if interleaved:  # an invalid position before a valid +inf key must still sort after it
        order = order.gather(1, torch.sort((~valid).gather(1, order).int(), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, positions.expand(batch, width).contiguous())
    return rank


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of a tokenizer (vocabulary, special tokens, chat template).

    Written into the scores manifest, checked by ``TokenScoreDataset`` at load: the ids that were scored
    must be the ids that are trained.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = {
        "vocab": vocab,
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
        "pad": tokenizer.pad_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 2048) -> torch.Tensor:
    """``log p(labels) = log_softmax(logits)[label]`` in fp32, on the logits' device.

    Args:
        logits: [..., V] in any float dtype. labels: [...] long, same leading shape.
    Returns:
        fp32 tensor of ``labels``' shape.

    Upcasts ``chunk_tokens`` positions at a time, so bf16 logits are never copied whole to fp32 and no
    [T, V] log-softmax is ever materialised (fp32 logits are used in place; each chunk's log-softmax is one
    [chunk_tokens, V] block). Each position's normalizer is reduced on its own, so the chunk size changes no bit of
    the result; a lone last position joins the chunk before it (a one-row reduction over a large vocabulary may be
    split across threads, which would). The fused log-softmax kernel reads a row twice and writes it once, against
    logsumexp's max, difference, exp and sum passes: on the CPU it is the cheaper of the two (20-35% on [240, 8192]
    fp32 blocks, 2026-12-01), and it agrees with ``logits[label] - logsumexp(logits)`` to float rounding.
    """
    vocab = logits.shape[-1]
    flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1, 1)
    n = flat_labels.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    start = 0
    while start < n:
        end = n if n - start <= chunk_tokens + 1 else start + chunk_tokens
        block = torch.log_softmax(flat[start:end].float(), dim=-1)
        out[start:end] = block.gather(1, flat_labels[start:end]).squeeze(1)
        start = end
    return out.view(labels.shape)


class LabelLogProbs(torch.autograd.Function):
    """Training's per-token log-probs (``label_logprobs`` is inference's, chunked, in the same place):
    ``log p(label) = z[label] - logsumexp(z)`` for logits rows z [N, V] upcast to fp32, labels [N] -> [N] fp32.

    Autograd's own graph of that expression keeps the fp32 logits and builds about four more [N, V] tensors in
    backward (gather's zero-filled gradient, logsumexp's difference, exp and product, their sum); this backward
    builds one, ``grad * (onehot(label) - softmax(z))``, which is the same gradient. Backward runs once per graph.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(z, lse, labels)
        ctx.logits_dtype = logits.dtype
        return z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        z, lse, labels = ctx.saved_tensors
        grad_z = (z - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        grad_z.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_z.to(ctx.logits_dtype), None


# The log-normalizer on the CPU is memory-bound: chunks of positions whose fp32 logits stay in cache (2 MiB) beat
# one pass over the whole [B * T, V] block (2 cores, one [272, 8192] block: median 2.4 ms against 3.8 ms), with the
# very same bits. A GPU keeps the one big chunk of earlier versions.
CPU_NORMALIZER_BYTES = 2 << 20


def _normalizer_chunk(logits) -> int:
    return 2048 if logits.device.type != "cpu" else max(2, CPU_NORMALIZER_BYTES // (4 * logits.shape[-1]))


def _accepts_logits_to_keep(model) -> bool:
    forward = model.forward
    return _takes_logits_to_keep(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(forward) -> bool:  # once per forward function, not on every batch
    import inspect

    return "logits_to_keep" in inspect.signature(forward).parameters


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """``log pi(ids[t] | ids[<t])`` for every position t in [start, T) of a right-padded batch: [B, T - start], fp32.

    Position t-1 of a causal LM's logits predicts ids[t], so only the logits of positions start-1 .. T-1 are
    computed (``logits_to_keep``): prompt logits are never materialised. ``start`` must be >= 1 (token 0
    has no context). Column j is the log-prob of ids[:, start + j]; padding columns hold garbage.
    """
    if start < 1:
        raise ValueError("start must be >= 1: the first token of a sequence has no context to be scored from")
    width = input_ids.shape[1]
    keep = width - start + 1
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -keep:]
    # Last kept position predicts past the end; give it a dummy label and drop it, instead of slicing the
    # logits (a slice would force a copy of the whole [B, keep, V] tensor in label_logprobs' reshape).
    labels = torch.cat([input_ids[:, start:], input_ids[:, :1]], dim=1)
    return label_logprobs(logits, labels, chunk_tokens=_normalizer_chunk(logits))[:, :-1]


# Logit transforms some causal LMs apply after the LM head (Gemma 2's softcapping, Cohere's scale, Granite's
# divisor): a model whose config sets one is never scored through ``_plain_head``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_PLAIN_HEADS = weakref.WeakKeyDictionary()  # model -> (body, lm_head) or None, decided on its first batch


def _split_head(model):
    """``(body, lm_head)`` that ``model``'s logits may be (``lm_head(body(...).last_hidden_state)``), or None: its
    output embedding an ``nn.Linear``, a base model other than itself, no logit transform in its config."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if (isinstance(head, torch.nn.Linear) and isinstance(body, torch.nn.Module) and body is not model
            and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)):
        return body, head
    return None


def _hidden_checked(model, input_ids, attention_mask):
    """A model's first batch: its own forward (the logits of the last position only), the body's last hidden state
    caught on the way by a forward hook -> (the hidden states, or None when the model's logits there are not the LM
    head's on them). Checking costs one [B, V] LM head, not a second forward."""
    split, caught = _split_head(model), []
    if split is None:
        return None
    body, head = split
    handle = body.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    try:
        kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        own = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits[:, -1:]
    finally:
        handle.remove()
    if len(caught) != 1 or not isinstance(caught[0], torch.Tensor) or caught[0].shape[:2] != input_ids.shape:
        return None
    mine = head(caught[0][:, -1:])
    if mine.shape != own.shape or not torch.allclose(mine.float(), own.float(), rtol=1e-3, atol=1e-3):
        return None
    return caught[0]


def scored_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                    scored: torch.Tensor) -> torch.Tensor:
    """``log pi(ids[i, t] | ids[i, <t])`` at the scored tokens of a right-padded batch, packed row by row: [n] fp32.

    ``scored`` [B, T - start] bool: column j stands for token ``start + j``; n is its number of True entries, in
    row-major order. The LM head and the log-softmax run at those n positions only (the hidden state at t - 1
    predicts token t): never at a prompt position of a row whose prompt is longer than ``start``, nor at padding.

    That needs the LM head apart from the body. Whether a model's logits are exactly ``lm_head(body(...)
    .last_hidden_state)`` (``_split_head``: a linear output embedding, a base model, no logit softcapping or
    scaling in the config) is checked on its first batch against its own forward (``_hidden_checked``), once per
    model object; a model that fails it is scored through its own forward with ``logits_to_keep``
    (``response_logprobs``), with the same result up to float rounding.
    """
    if model not in _PLAIN_HEADS:
        hidden = _hidden_checked(model, input_ids, attention_mask)
        _PLAIN_HEADS[model] = None if hidden is None else _split_head(model)
        if hidden is None:
            return response_logprobs(model, input_ids, attention_mask, start)[scored]
    elif _PLAIN_HEADS[model] is None:
        return response_logprobs(model, input_ids, attention_mask, start)[scored]
    else:
        body = _PLAIN_HEADS[model][0]
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = _PLAIN_HEADS[model][1]
    logits = head(hidden[:, start - 1 : -1][scored])  # [n, V]: the scored tokens' predictions, nothing else
    return label_logprobs(logits, input_ids[:, start:][scored], chunk_tokens=_normalizer_chunk(logits))


@torch.inference_mode()
def token_scores(oracle, ref, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens, lengths):
    """Token rewards of a right-padded batch of sequences, one fp32 CPU tensor per row.

    Row i gets ``r_t = log pi_oracle(y_t | .) - log pi_ref(y_t | .)`` for every response token
    t in [prompt_lens[i], lengths[i]) -- the first response token and EOS included -- in order.
    Both models run on the batch's device; the LM head and log-softmax run at those tokens only
    (``scored_logprobs``); only the packed scores are copied to the host (the rows are views of one tensor).
    """
    prompt_lens, lengths = [int(p) for p in prompt_lens], [int(n) for n in lengths]
    start = min(prompt_lens)
    if start < 1:
        raise ValueError("a prompt of 0 tokens: the first response token would have no context to be scored from")
    token = torch.arange(start, input_ids.shape[1], device=input_ids.device)
    first = torch.tensor(prompt_lens, device=input_ids.device).unsqueeze(1)
    end = torch.tensor(lengths, device=input_ids.device).unsqueeze(1)
    scored = (token >= first) & (token < end)  # [B, T - start]
    scores = scored_logprobs(oracle, input_ids, attention_mask, start, scored)
    scores -= scored_logprobs(ref, input_ids, attention_mask, start, scored)
    return list(torch.split(scores.cpu(), [max(n - p, 0) for p, n in zip(prompt_lens, lengths)]))

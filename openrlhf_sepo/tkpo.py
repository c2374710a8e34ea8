"""TKPO's token-level list-wise loss with self-sampled negatives (Li et al., ACL 2025 Findings, "token-level
preference self-alignment optimization").

Data: SFT rows (prompt x with a controllable style attribute, gold response y); x' is x with the attribute swapped,
y unchanged. At response offset t (aligned by offset: x and x' may tokenize to different lengths)

    p_t = pi_theta(. | x, y_<t)      the policy's next-token distribution (with gradient)
    q_t = pi_theta(. | x', y_<t)     the same model under the counterfactual prompt (no gradient)

Negatives: N_t = K token ids drawn from q_t without replacement, the gold y_t excluded, by Gumbel-top-k:
``top-k of log q_t(v) + g_v`` with ``log q_t(y_t) = -inf`` and g_v ~ Gumbel(0, 1) i.i.d., which is exactly sampling
K times without replacement from q_t renormalised over V \\ {y_t} (Plackett-Luce).

Per-position term (top-1 Plackett-Luce probability of the gold token, on probabilities, temperature tau):

    s(v) = exp(p_t(v) / tau)
    r_t  = s(y_t) / (s(y_t) + sum_{v in N_t} s(v))                 (computed as a log-sum-exp of p / tau)
    K = 1:  r_t = sigmoid((p_t(y_t) - p_t(n)) / tau)                (Bradley-Terry)

Sequence term over the response tokens T_b of row b, then the mean over rows (rows without a token are left out):

    log_mean  L_b = -log( mean_{t in T_b} r_t )                    (default; the released code)
    mean_log  L_b = mean_{t in T_b} ( -log r_t )                    (the per-token average of the list-wise loss)

Released code vs paper: ``aggregation="log_mean"`` and ``negatives_grad=False`` (the negatives' p_t(v) detached)
follow the released single-sample code; ``negatives_grad=True`` is the paper's figure and its batched variant,
where the gradient also pushes the negatives' probabilities down. The gold's p_t(y_t) always carries gradient, and
since p_t is a softmax over the whole vocabulary that gradient reaches every logit either way. This module is the
TKPO term only; the trainer adds it to the SFT loss.

Memory (vocabularies of 150k): valid (row, offset) pairs are flattened in row-major order and processed
``chunk_size`` at a time; per chunk the rows of the (possibly bf16) logits are gathered and upcast to fp32, so no
fp32 [T, V] tensor exists beyond a chunk. Backward recomputes each chunk and adds its gradient into one
logits-shaped buffer: plain autograd would keep every chunk's fp32 rows (an fp32 [M, V] in total) and build one
zero-filled logits-sized gradient per chunk.

Gumbel noise independent of chunking: before any chunk, one 64-bit key per flattened token is drawn from the
``generator`` (an [M, 2] int64 tensor, in the row-major order above). The noise of token m at vocab id v is a
counter-based hash of (key_m, v) (two rounds of the 32-bit ``lowbias32`` mixer in exact int64 arithmetic), so it
depends on neither the chunk a token falls in nor the device: chunked and unchunked runs draw the same negatives.
"""

import torch
from torch.autograd.function import once_differentiable

NEGATIVE_AGGREGATIONS = ("log_mean", "mean_log")

_M32 = 0xFFFFFFFF


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """x = (x * c) mod 2**32 in place, for int64 0 <= x < 2**32: split c in 16-bit halves so no product overflows int64
    (signed overflow would be undefined behaviour, not a wrap we could rely on)."""
    high = x * (c >> 16)
    high &= 0xFFFF
    high <<= 16
    x *= c & 0xFFFF
    x += high
    x &= _M32
    return x


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, hash-prospector) in place: a bijection of [0, 2**32) with near-ideal avalanche."""
    x ^= x >> 16
    _mul32_(x, 0x7FEB352D)
    x ^= x >> 15
    _mul32_(x, 0x846CA68B)
    x ^= x >> 16
    return x


def draw_keys(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, 2] int64 in [0, 2**32): one noise key per token, from ``generator`` (if None: torch's default CPU one)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**32, (n, 2), generator=generator, device=device, dtype=torch.int64)


def gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, V] fp32 standard Gumbel noise, a pure function of (keys[m], v).

    The uniform is u = (2h + 1) / 2**24 with h the top 23 bits of the hash: exactly representable in fp32 and
    strictly inside (0, 1), so -log(-log u) is finite (in [-2.8, 16.6]).
    """
    x = torch.arange(vocab_size, device=keys.device, dtype=torch.int64).unsqueeze(0) ^ keys[:, :1]
    _mix32_(x)
    x ^= keys[:, 1:]
    _mix32_(x)
    x >>= 9
    x <<= 1
    x += 1
    u = x.float().mul_(2.0**-24)
    return u.log_().neg_().log_().neg_()


def sample_negatives(log_q: torch.Tensor, gold: torch.Tensor, k: int, generator: torch.Generator | None = None,
                     keys: torch.Tensor | None = None) -> torch.Tensor:
    """[M, k] long: per row, k distinct token ids drawn from softmax(log_q) without replacement, ``gold`` excluded.

    Gumbel-top-k on ``log_q`` [M, V] (log-probabilities, or logits: only differences within a row matter) with the
    gold's key at -inf. ``keys`` [M, 2] (from ``draw_keys``) fix the noise; if None they are drawn from ``generator``,
    so ``sample_negatives(log_q, gold, k, torch.Generator().manual_seed(s))`` reproduces TKPOLoss's negatives for the
    same seed when log_q holds its flattened valid tokens in row-major order.
    """
    m, vocab = log_q.shape
    if not 1 <= k < vocab:
        raise ValueError(f"number of negatives must be in [1, V - 1] = [1, {vocab - 1}], got {k}")
    if gold.shape != (m,):
        raise ValueError(f"gold {tuple(gold.shape)} must be [M] = [{m}]")
    if keys is None:
        keys = draw_keys(m, generator)
    keys = keys.to(log_q.device)
    scores = gumbel_noise(keys, vocab).add_(log_q)  # in place: no fp32 copy of a bf16 log_q besides the noise
    # Tokens with q = 0 (-inf) get the lowest finite score, so that the gold (-inf) sorts strictly last and is never
    # drawn, even when fewer than k tokens have mass.
    scores.clamp_(min=torch.finfo(scores.dtype).min)
    scores.scatter_(1, gold.unsqueeze(1), float("-inf"))
    return scores.topk(k, dim=1).indices


def tkpo_log_r(logits: torch.Tensor, gold: torch.Tensor, negatives: torch.Tensor, tau: float,
               negatives_grad: bool = False):
    """(log r_t [M], gold_rank [M]) from policy logits rows [M, V] (any float dtype; upcast to fp32 here).

    ``log r_t = p(y)/tau - logsumexp(p(y)/tau, p(n_1)/tau, ..., p(n_K)/tau)`` with p = softmax(logits); only the K+1
    needed probabilities are formed, as exp(z - logsumexp(z)). ``gold_rank``: how many negatives have p > p(y).
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p_gold = (z.gather(1, gold.unsqueeze(1)) - lse).exp()
    p_neg = (z.gather(1, negatives) - lse).exp()
    if not negatives_grad:
        p_neg = p_neg.detach()
    a = torch.cat([p_gold, p_neg], dim=1) / tau
    log_r = a[:, 0] - torch.logsumexp(a, dim=1)
    gold_rank = (p_neg > p_gold).sum(1).float()
    return log_r, gold_rank


class _ChunkedLogR(torch.autograd.Function):
    """(log r [M], gold_rank [M]) of the flattened tokens, ``chunk_size`` rows of logits at a time in forward and in
    backward (which recomputes the chunk rather than keeping its fp32 rows)."""

    @staticmethod
    def forward(ctx, logits, rows_b, rows_t, gold, negatives, tau, negatives_grad, chunk_size):
        log_r, gold_rank = [], []
        for start in range(0, len(gold), chunk_size):
            sl = slice(start, start + chunk_size)
            lr, gr = tkpo_log_r(logits[rows_b[sl], rows_t[sl]], gold[sl], negatives[sl], tau, negatives_grad)
            log_r.append(lr)
            gold_rank.append(gr)
        ctx.save_for_backward(logits, rows_b, rows_t, gold, negatives)
        ctx.settings = (tau, negatives_grad, chunk_size)
        gold_rank = torch.cat(gold_rank)
        ctx.mark_non_differentiable(gold_rank)
        return torch.cat(log_r), gold_rank

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_r, _):
        logits, rows_b, rows_t, gold, negatives = ctx.saved_tensors
        tau, negatives_grad, chunk_size = ctx.settings
        grad = torch.zeros_like(logits)
        for start in range(0, len(gold), chunk_size):
            sl = slice(start, start + chunk_size)
            with torch.enable_grad():
                z = logits[rows_b[sl], rows_t[sl]].float().requires_grad_()
                lr, _ = tkpo_log_r(z, gold[sl], negatives[sl], tau, negatives_grad)
                (grad_z,) = torch.autograd.grad(lr, z, grad_log_r[sl])
            # accumulate: a position listed twice in policy_index gets both gradients, as plain autograd would.
            grad.index_put_((rows_b[sl], rows_t[sl]), grad_z.to(grad.dtype), accumulate=True)
        return grad, None, None, None, None, None, None, None


class TKPOLoss(torch.nn.Module):
    """TKPO loss (formulas in the module docstring).

    ``forward(logits, cf_logits, labels, policy_index, cf_index, mask, generator=None) -> (loss, stats)``:
    logits [B, T, V] (policy on (x, y), with grad), cf_logits [B, T2, V] (the model on (x', y); never receives a
    gradient), labels [B, N] long (response tokens y_t), policy_index / cf_index [B, N] long: the positions of
    logits / cf_logits whose distribution predicts labels[b, j], mask [B, N] bool (valid response tokens; entries of
    labels and indices under a False mask are ignored). stats: ``tkpo_loss``; ``r_mean`` the mean r_t over valid
    tokens; ``gold_rank`` the mean over valid tokens of the number of negatives whose p_t exceeds the gold's (0: the
    gold ranks first). A row without a valid token is left out of the mean; a batch without any raises ValueError.
    """

    def __init__(self, num_negatives: int = 20, tau: float = 0.15, aggregation: str = "log_mean",
                 negatives_grad: bool = False, chunk_size: int = 1024) -> None:
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"TKPOLoss num_negatives must be >= 1, got {num_negatives}")
        if not tau > 0:
            raise ValueError(f"TKPOLoss tau must be > 0, got {tau}")
        if aggregation not in NEGATIVE_AGGREGATIONS:
            raise ValueError(f"TKPOLoss aggregation must be one of {NEGATIVE_AGGREGATIONS}, got {aggregation!r}")
        if chunk_size < 1:
            raise ValueError(f"TKPOLoss chunk_size must be >= 1, got {chunk_size}")
        self.num_negatives = num_negatives
        self.tau = tau
        self.aggregation = aggregation
        self.negatives_grad = negatives_grad
        self.chunk_size = chunk_size

    def forward(self, logits, cf_logits, labels, policy_index, cf_index, mask, generator=None):
        batch, _, vocab = logits.shape
        if cf_logits.dim() != 3 or cf_logits.shape[0] != batch or cf_logits.shape[-1] != vocab:
            raise ValueError(f"cf_logits {tuple(cf_logits.shape)} must be [B, T2, V] with B, V of logits "
                             f"{tuple(logits.shape)}")
        for name, t in (("labels", labels), ("policy_index", policy_index), ("cf_index", cf_index)):
            if t.shape != mask.shape or t.dim() != 2 or t.shape[0] != batch:
                raise ValueError(f"{name} {tuple(t.shape)} and mask {tuple(mask.shape)} must both be [B, N], "
                                 f"B = {batch}")
        if not self.num_negatives < vocab:
            raise ValueError(f"TKPOLoss num_negatives must be < V = {vocab} (the gold is excluded), "
                             f"got {self.num_negatives}")
        mask = mask.bool()
        rows_b, rows_j = mask.nonzero(as_tuple=True)  # row-major: fixes which noise key each token gets
        if rows_b.numel() == 0:
            raise ValueError("TKPOLoss: the batch has no valid response token (mask is all False)")
        gold, pol_t, cf_t = labels[rows_b, rows_j], policy_index[rows_b, rows_j], cf_index[rows_b, rows_j]
        for name, t, size in (("labels", gold, vocab), ("policy_index", pol_t, logits.shape[1]),
                              ("cf_index", cf_t, cf_logits.shape[1])):
            if (t < 0).any() or (t >= size).any():
                raise ValueError(f"{name} has values outside [0, {size}) at valid tokens")

        keys = draw_keys(rows_b.numel(), generator).to(logits.device)
        negatives = []
        with torch.no_grad():
            for start in range(0, rows_b.numel(), self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                # Raw logits: Gumbel-top-k only compares within a row, so log q_t's normaliser is not needed.
                negatives.append(sample_negatives(cf_logits.detach()[rows_b[sl], cf_t[sl]], gold[sl],
                                                  self.num_negatives, keys=keys[sl]))
        log_r, gold_rank = _ChunkedLogR.apply(logits, rows_b, pol_t, gold, torch.cat(negatives), self.tau,
                                              self.negatives_grad, self.chunk_size)

        # Aggregate once over all tokens (not per chunk), so the sums do not depend on chunk_size.
        counts = mask.sum(1)
        keep = counts > 0
        if self.aggregation == "log_mean":
            padded = torch.full(mask.shape, float("-inf"), device=log_r.device).index_put((rows_b, rows_j), log_r)
            # -log(mean_t r_t) = log n - logsumexp_t(log r_t): stable for r_t far below 1 (small tau, large K).
            per_row = counts[keep].float().log() - torch.logsumexp(padded[keep], dim=1)
        else:
            per_row = -torch.zeros(batch, device=log_r.device).index_add(0, rows_b, log_r)[keep] / counts[keep]
        loss = per_row.mean()
        stats = {"tkpo_loss": loss.item(), "r_mean": log_r.detach().exp().mean().item(),
                 "gold_rank": gold_rank.mean().item()}
        return loss, stats

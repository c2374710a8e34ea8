"""TKPOLoss: Bradley-Terry at K = 1, a hand-computed K = 2 case, the negative sampler (gold excluded, without
replacement, Plackett-Luce inclusion probabilities), chunking, gradient flow, prompt alignment, bf16, seeds."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from openrlhf_sepo.tkpo import NEGATIVE_AGGREGATIONS, TKPOLoss, draw_keys, gumbel_noise, sample_negatives


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_batch(seed=0, batch=3, n=5, vocab=16, t=9, t2=11, lengths=(5, 3, 4)):
    """Random policy / counterfactual logits, labels and a mask with rows of ``lengths`` valid tokens; the response
    offset j is predicted at position j + 1 of logits and j + 3 of cf_logits (a longer counterfactual prompt)."""
    g = gen(seed)
    logits = torch.randn(batch, t, vocab, generator=g) * 3
    cf_logits = torch.randn(batch, t2, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (batch, n), generator=g)
    mask = torch.arange(n) < torch.tensor(lengths).unsqueeze(1)
    policy_index = (torch.arange(n) + 1).expand(batch, n).clone()
    cf_index = (torch.arange(n) + 3).expand(batch, n).clone()
    return logits, cf_logits, labels, policy_index, cf_index, mask


def reference(logits, cf_logits, labels, policy_index, cf_index, mask, k, tau, seed, aggregation="log_mean",
              negatives_grad=False):
    """The loss from the full softmax, the negatives re-drawn with sample_negatives on the flattened valid tokens."""
    rows_b, rows_j = mask.nonzero(as_tuple=True)
    gold = labels[rows_b, rows_j]
    negatives = sample_negatives(cf_logits.detach()[rows_b, cf_index[rows_b, rows_j]], gold, k, gen(seed))
    p = F.softmax(logits.float(), -1)[rows_b, policy_index[rows_b, rows_j]]
    p_gold = p.gather(1, gold[:, None])
    p_neg = p.gather(1, negatives)
    if not negatives_grad:
        p_neg = p_neg.detach()
    r = torch.exp(p_gold[:, 0] / tau) / (torch.exp(p_gold[:, 0] / tau) + torch.exp(p_neg / tau).sum(1))
    per_row = []
    for b in range(mask.shape[0]):
        rb = r[rows_b == b]
        if len(rb):
            per_row.append(-rb.mean().log() if aggregation == "log_mean" else -rb.log().mean())
    return torch.stack(per_row).mean(), r, negatives


def test_k1_is_bradley_terry_on_probabilities():
    logits, cf, labels, pidx, cidx, mask = make_batch(seed=1)
    tau = 0.3
    loss, stats = TKPOLoss(num_negatives=1, tau=tau, aggregation="mean_log")(logits, cf, labels, pidx, cidx, mask,
                                                                           generator=gen(7))
    rows_b, rows_j = mask.nonzero(as_tuple=True)
    negatives = sample_negatives(cf[rows_b, cidx[rows_b, rows_j]], labels[rows_b, rows_j], 1, gen(7))[:, 0]
    r, ranks = [], []
    for m, (b, j) in enumerate(zip(rows_b.tolist(), rows_j.tolist())):
        row = logits[b, pidx[b, j]].tolist()
        total = sum(math.exp(x) for x in row)
        p_y, p_n = math.exp(row[labels[b, j]]) / total, math.exp(row[negatives[m]]) / total
        r.append(1 / (1 + math.exp(-(p_y - p_n) / tau)))
        ranks.append(float(p_n > p_y))
    expected = sum(-sum(math.log(x) for x, rb in zip(r, rows_b.tolist()) if rb == b) / int(mask[b].sum())
                   for b in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["r_mean"] == pytest.approx(sum(r) / len(r), rel=1e-5)
    assert stats["gold_rank"] == pytest.approx(sum(ranks) / len(ranks))
    assert stats["tkpo_loss"] == pytest.approx(loss.item())


def test_hand_computed_k2_both_aggregations():
    # V = 3 and K = 2: the negatives are the two non-gold tokens whatever the noise, so everything is by hand.
    tau = 0.5
    rows = [[[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]], [[0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]]  # [B=2, T=2, V=3]
    labels = torch.tensor([[0, 1], [2, 0]])
    mask = torch.tensor([[True, True], [True, False]])  # row 1 has one token; its second position is padding
    idx = torch.tensor([[0, 1], [0, 1]])
    logits = torch.tensor(rows)
    cf = torch.zeros(2, 2, 3)

    def r_of(row, y):
        total = sum(math.exp(v) for v in row)
        p = [math.exp(x) / total for x in row]
        s = [math.exp(x / tau) for x in p]
        return s[y] / sum(s)

    r = [[r_of(rows[0][0], 0), r_of(rows[0][1], 1)], [r_of(rows[1][0], 2)]]
    log_mean = (-math.log(sum(r[0]) / 2) - math.log(r[1][0])) / 2
    mean_log = ((-math.log(r[0][0]) - math.log(r[0][1])) / 2 - math.log(r[1][0])) / 2
    for aggregation, expected in (("log_mean", log_mean), ("mean_log", mean_log)):
        loss, stats = TKPOLoss(2, tau, aggregation)(logits, cf, labels, idx, idx, mask, generator=gen(0))
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert stats["r_mean"] == pytest.approx((r[0][0] + r[0][1] + r[1][0]) / 3, rel=1e-6)
    assert stats["gold_rank"] == 0.0  # every gold has the largest p of its row
    # Gold 2 of [1, 0, -1]: both negatives above (2); gold 0 of [0, 2, 0]: one above, one tied (a tie is not above,
    # 1); gold 0 of [0.5, 0.5, 3]: 1.
    _, stats = TKPOLoss(2, tau)(logits, cf, torch.tensor([[2, 0], [0, 0]]), idx, idx, mask, generator=gen(0))
    assert stats["gold_rank"] == pytest.approx((2 + 1 + 1) / 3)


def test_gold_never_drawn():
    vocab, k = 12, 5
    log_q = torch.full((64, vocab), -12.0)
    gold = torch.arange(64) % vocab
    log_q[torch.arange(64), gold] = 0.0  # almost all mass on the gold
    log_q[:8, :] = float("-inf")  # rows with fewer than k tokens of mass besides the gold
    log_q[torch.arange(8), gold[:8]] = 0.0
    log_q[torch.arange(8), (gold[:8] + 1) % vocab] = -1.0
    for seed in range(200):
        negatives = sample_negatives(log_q, gold, k, gen(seed))
        assert not (negatives == gold[:, None]).any()
        assert ((negatives >= 0) & (negatives < vocab)).all()
    assert (negatives[:8] == ((gold[:8] + 1) % vocab)[:, None]).any(1).all()  # the one token with mass is drawn


def test_without_replacement_and_plackett_luce_inclusion():
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    gold, k, draws = 1, 2, 20000
    negatives = sample_negatives(q.log().expand(draws, 4), torch.full((draws,), gold), k, gen(3))
    assert (negatives[:, 0] != negatives[:, 1]).all()
    # Exact inclusion probabilities of sampling k = 2 without replacement from q renormalised over {0, 2, 3}.
    others = [v for v in range(4) if v != gold]
    w = {v: q[v].item() / sum(q[u].item() for u in others) for v in others}
    exact = {v: 0.0 for v in others}
    for order in itertools.permutations(others, k):
        prob, left = 1.0, 1.0
        for v in order:
            prob *= w[v] / left
            left -= w[v]
        for v in order:
            exact[v] += prob
    freq = {v: (negatives == v).any(1).float().mean().item() for v in range(4)}
    assert freq[gold] == 0.0
    for v in others:
        assert freq[v] == pytest.approx(exact[v], abs=0.015), (v, freq, exact)
    # The first draw alone follows q renormalised.
    for v in others:
        assert (negatives[:, 0] == v).float().mean().item() == pytest.approx(w[v], abs=0.015)


def test_noise_is_a_function_of_key_and_token():
    keys = draw_keys(6, gen(0))
    full = gumbel_noise(keys, 50)
    assert torch.equal(full[2:5], gumbel_noise(keys[2:5], 50))
    assert torch.equal(full[:, :20], gumbel_noise(keys, 20))
    assert torch.isfinite(full).all()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    g = gumbel_noise(draw_keys(400, gen(1)), 500)
    assert g.mean().item() == pytest.approx(0.5772, abs=0.01)
    assert g.var().item() == pytest.approx(math.pi**2 / 6, abs=0.03)


@pytest.mark.parametrize("negatives_grad", [False, True])
def test_chunked_equals_unchunked(negatives_grad):
    batch = make_batch(seed=2)
    results = []
    for chunk in (1, 3, 1000):
        logits = batch[0].clone().requires_grad_()
        loss, stats = TKPOLoss(4, 0.2, negatives_grad=negatives_grad, chunk_size=chunk)(logits, *batch[1:],
                                                                                          generator=gen(11))
        loss.backward()
        results.append((loss.detach(), logits.grad, stats))
    for loss, grad, stats in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(grad, results[0][1])
        assert stats == results[0][2]


@pytest.mark.parametrize("aggregation", NEGATIVE_AGGREGATIONS)
def test_gradient_flow(aggregation):
    logits0, cf0, labels, pidx, cidx, mask = make_batch(seed=4, vocab=8)
    k, tau = 3, 0.1  # a small vocabulary and tau make the negatives' gradient share large
    grads = {}
    for negatives_grad in (False, True):
        logits = logits0.clone().requires_grad_()
        cf = cf0.clone().requires_grad_()
        loss, _ = TKPOLoss(k, tau, aggregation, negatives_grad, chunk_size=4)(logits, cf, labels, pidx, cidx, mask,
                                                                               generator=gen(5))
        loss.backward()
        assert cf.grad is None  # the counterfactual pass never receives a gradient
        ref_logits = logits0.clone().requires_grad_()
        ref_loss, _, _ = reference(ref_logits, cf0, labels, pidx, cidx, mask, k, tau, 5, aggregation, negatives_grad)
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
        grads[negatives_grad] = logits.grad
    assert not torch.allclose(grads[False], grads[True], rtol=1e-3, atol=1e-6)
    # Only positions that predict a valid token get a gradient, at every logit of them (the gold's softmax).
    used = torch.zeros(logits0.shape[:2], dtype=torch.bool)
    used[mask.nonzero()[:, 0], pidx[mask]] = True
    assert (grads[False].abs().sum(-1) > 0).equal(used)
    assert (grads[False][used] != 0).all()


def test_backward_keeps_no_vocab_sized_copy():
    """Autograd saves the logits themselves (no copy) and no other [*, V] tensor: backward recomputes the chunks."""
    logits, cf, labels, pidx, cidx, mask = make_batch(seed=14, vocab=48)
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _ = TKPOLoss(4, 0.2, negatives_grad=True, chunk_size=2)(logits, cf, labels, pidx, cidx, mask,
                                                                       generator=gen(0))
    assert any(t is logits for t in saved)
    assert not [tuple(t.shape) for t in saved if t is not logits and t.shape[-1] == 48]
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_alignment_by_response_offset():
    g = gen(6)
    vocab, n = 10, 4
    lengths = [4, 2, 3]
    prompt, cf_prompt = [2, 5, 3], [4, 1, 3]  # x' longer, shorter, equal
    t = max(p + m for p, m in zip(prompt, lengths))
    t2 = max(p + m for p, m in zip(cf_prompt, lengths))
    logits = torch.randn(3, t, vocab, generator=g) * 3
    cf = torch.randn(3, t2, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (3, n), generator=g)
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    # The last prompt token predicts the first response token; positions under a False mask are garbage.
    pidx = torch.tensor(prompt)[:, None] - 1 + torch.arange(n)
    cidx = torch.tensor(cf_prompt)[:, None] - 1 + torch.arange(n)
    pidx[~mask], cidx[~mask] = -1, 10**6
    loss_fn = TKPOLoss(3, 0.2)
    loss, stats = loss_fn(logits, cf, labels, pidx, cidx, mask, generator=gen(8))

    aligned = torch.zeros(3, n, vocab)
    cf_aligned = torch.zeros(3, n, vocab)
    for b in range(3):
        for j in range(lengths[b]):
            aligned[b, j] = logits[b, prompt[b] - 1 + j]
            cf_aligned[b, j] = cf[b, cf_prompt[b] - 1 + j]
    idx = torch.arange(n).expand(3, n)
    loss_al, stats_al = loss_fn(aligned, cf_aligned, labels, idx, idx, mask, generator=gen(8))
    assert torch.equal(loss, loss_al) and stats == stats_al
    # Control: reading q at the policy's positions instead is a different loss.
    wrong, _ = loss_fn(logits, cf, labels, pidx.clamp(min=0), pidx.clamp(min=0), mask, generator=gen(8))
    assert wrong.item() != pytest.approx(loss.item())


def test_bf16_logits():
    logits, cf, labels, pidx, cidx, mask = make_batch(seed=9, vocab=64)
    logits16, cf16 = logits.bfloat16().requires_grad_(), cf.bfloat16()
    loss_fn = TKPOLoss(8, 0.15, chunk_size=4)
    loss16, stats16 = loss_fn(logits16, cf16, labels, pidx, cidx, mask, generator=gen(1))
    loss16.backward()
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert logits16.grad.dtype == torch.bfloat16 and torch.isfinite(logits16.grad).all()
    # fp32 on the same (bf16-representable) values: every row is upcast before the softmax, so they agree.
    logits32 = logits16.detach().float().requires_grad_()
    loss32, stats32 = loss_fn(logits32, cf16.float(), labels, pidx, cidx, mask, generator=gen(1))
    loss32.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-6)
    assert stats16 == pytest.approx(stats32, rel=1e-6)
    torch.testing.assert_close(logits16.grad.float(), logits32.grad, rtol=1e-2, atol=1e-4)
    # And close to fp32 on the original values (bf16 rounding only).
    loss_orig, _ = loss_fn(logits, cf, labels, pidx, cidx, mask, generator=gen(1))
    assert loss16.item() == pytest.approx(loss_orig.item(), rel=0.05)


def test_seed_reproducibility():
    batch = make_batch(seed=10, vocab=64)
    loss_fn = TKPOLoss(5, 0.15)
    a, _ = loss_fn(*batch, generator=gen(1))
    b, _ = loss_fn(*batch, generator=gen(1))
    c, _ = loss_fn(*batch, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, _, neg1 = reference(*batch, 5, 0.15, seed=1)
    _, _, neg1b = reference(*batch, 5, 0.15, seed=1)
    _, _, neg2 = reference(*batch, 5, 0.15, seed=2)
    assert torch.equal(neg1, neg1b)
    assert not torch.equal(neg1.sort(1).values, neg2.sort(1).values)
    # The default generator works too.
    torch.manual_seed(0)
    d, _ = loss_fn(*batch)
    assert torch.isfinite(d)


def test_empty_rows_and_validation():
    logits, cf, labels, pidx, cidx, mask = make_batch(seed=12, lengths=(5, 0, 4))
    loss_fn = TKPOLoss(3, 0.2)
    loss, stats = loss_fn(logits, cf, labels, pidx, cidx, mask, generator=gen(0))
    keep = [0, 2]  # dropping the empty row leaves the flattened tokens, hence their noise keys, unchanged
    loss2, stats2 = loss_fn(logits[keep], cf[keep], labels[keep], pidx[keep], cidx[keep], mask[keep],
                            generator=gen(0))
    assert torch.isfinite(loss) and torch.equal(loss, loss2) and stats == stats2
    with pytest.raises(ValueError, match="no valid response token"):
        loss_fn(logits, cf, labels, pidx, cidx, torch.zeros_like(mask), generator=gen(0))
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        TKPOLoss(0)
    with pytest.raises(ValueError, match="< V = 16"):
        TKPOLoss(16)(logits, cf, labels, pidx, cidx, mask)
    with pytest.raises(ValueError, match="tau must be > 0"):
        TKPOLoss(tau=0.0)
    with pytest.raises(ValueError, match="aggregation"):
        TKPOLoss(aggregation="mean")
    with pytest.raises(ValueError, match="cf_index"):
        loss_fn(logits, cf, labels, pidx, cidx + 100, mask)
    with pytest.raises(ValueError, match=r"\[1, V - 1\]"):
        sample_negatives(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 4, gen(0))


def test_tiny_tau_stays_finite():
    logits, cf, labels, pidx, cidx, mask = make_batch(seed=13, vocab=32)
    logits = (logits * 5).requires_grad_()
    for aggregation in NEGATIVE_AGGREGATIONS:
        loss, stats = TKPOLoss(20, 1e-4, aggregation, negatives_grad=True)(logits, cf, labels, pidx, cidx, mask,
                                                                          generator=gen(0))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        assert all(math.isfinite(v) for v in stats.values())
        logits.grad = None

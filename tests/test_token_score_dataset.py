"""TokenScoreDataset: masks land exactly on the selected tokens in log-prob layout (per_response, global, random),
a pair's common response prefix is never selected unless kept, batches pad like OpenRLHF's, and bad score dirs
are refused with a message naming the dir, the row or the setting."""

import json
import math
import os
import re

import pytest
import torch

from openrlhf_sepo.datasets import KeyTokens, ScoreDataError, TokenScoreDataset
from openrlhf_sepo.loss import SePOLoss
from openrlhf_sepo.scoring import select_key_tokens


def id_score(ids, prompt_len, side):
    """Each token's score is a function of its own id (and, to break most ties, its position)."""
    return [math.sin(tok * 1.7) + 1e-3 * j for j, tok in enumerate(ids[prompt_len:])]


@pytest.fixture(scope="module")
def score_dir(tiny_pairs, write_score_dir, tmp_path_factory):
    tokenizer, rows = tiny_pairs
    return write_score_dir(str(tmp_path_factory.mktemp("scores")), tokenizer, rows, id_score)


def common_prefix(prompt_len, chosen, rejected):
    """P: leading response tokens equal in chosen and rejected (a plain loop)."""
    n = 0
    while prompt_len + n < min(len(chosen), len(rejected)) and chosen[prompt_len + n] == rejected[prompt_len + n]:
        n += 1
    return n


def first_eligible(prompt_len, chosen, rejected, side, exclude=True):
    """First eligible response position of one side: min(P, N - 1) with exclusion, else 0."""
    ids = chosen if side == "chosen" else rejected
    return min(common_prefix(prompt_len, chosen, rejected), len(ids) - prompt_len - 1) if exclude else 0


def expected_per_response(ids, prompt_len, k, largest, start=0, score_fn=id_score):
    """Absolute positions the paper's rule selects among response positions >= start, by a plain sort
    (independent of select_key_tokens)."""
    scores = score_fn(ids, prompt_len, None)
    eligible = range(start, len(scores))
    n = max(1, math.floor(k * len(eligible) + 1e-9))
    order = sorted(eligible, key=lambda j: (-scores[j] if largest else scores[j], j))
    return {prompt_len + j for j in order[:n]}


def selected_positions(mask):
    """Absolute token positions of an item's [1, L-1] log-prob-layout mask (entry t -> token t + 1)."""
    return {t + 1 for t in mask[0].nonzero().flatten().tolist()}


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("k_chosen,k_rejected", [(0.3, 0.3), (0.5, 0.1), (1.0, 1.0)])
def test_per_response_masks_land_on_selected_tokens(tiny_pairs, score_dir, k_chosen, k_rejected, exclude):
    tokenizer, rows = tiny_pairs
    ds = TokenScoreDataset(score_dir, tokenizer, 128, k_chosen=k_chosen, k_rejected=k_rejected,
                           exclude_common_prefix=exclude)
    assert len(ds) == len(rows)
    for idx in range(len(rows)):
        prompt_len, chosen, rejected = rows[idx]
        c_ids, c_att, r_ids, r_att, p, c_sel, r_sel = ds[idx]
        assert p == prompt_len and c_ids[0].tolist() == chosen and r_ids[0].tolist() == rejected
        assert c_sel.shape == (1, len(chosen) - 1) and r_sel.shape == (1, len(rejected) - 1)
        c_start, r_start = (first_eligible(p, chosen, rejected, side, exclude) for side in ("chosen", "rejected"))
        # log-prob layout: entry t is log p(ids[t+1]) -> the selected token is ids[t+1]
        assert selected_positions(c_sel) == expected_per_response(chosen, p, k_chosen, True, c_start)
        assert selected_positions(r_sel) == expected_per_response(rejected, p, k_rejected, False, r_start)
        assert not c_sel[0, : p - 1].any()  # prompt never selected
        # the shift checked against the ids: the scores recomputed from the ids at t + 1 are the n highest
        selected = c_sel[0].nonzero().flatten().tolist()
        from_ids = sorted(math.sin(c_ids[0, t + 1].item() * 1.7) + 1e-3 * (t + 1 - p) for t in selected)
        assert from_ids == sorted(id_score(chosen, p, None)[c_start:])[-len(selected):]


def test_all_tokens_mask_is_openrlhf_response_mask(tiny_pairs, score_dir):
    """k = 1, common prefix kept: the selection is exactly the response mask OpenRLHF's
    DPOTrainer._get_batch_logps builds."""
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    tokenizer, rows = tiny_pairs
    ds = TokenScoreDataset(score_dir, tokenizer, 128, k_chosen=1.0, k_rejected=1.0, exclude_common_prefix=False)
    c_ids, c_att, r_ids, r_att, key_tokens = ds.collate_fn([ds[i] for i in range(4)])
    logps = torch.randn(c_ids.shape[0], c_ids.shape[1] - 1)
    sums, _ = DPOTrainer._get_batch_logps(None, logps, c_att, key_tokens.prompt_id_lens)
    torch.testing.assert_close((logps * key_tokens.chosen_mask).sum(-1), sums)


def test_collate_pads_like_openrlhf(tiny_pairs, score_dir):
    tokenizer, rows = tiny_pairs
    ds = TokenScoreDataset(score_dir, tokenizer, 128)
    items = [ds[i] for i in range(5)]
    c_ids, c_att, r_ids, r_att, key_tokens = ds.collate_fn(items)
    assert isinstance(key_tokens, KeyTokens) and key_tokens.prompt_id_lens == [it[4] for it in items]
    width = max(it[0].shape[1] for it in items)
    assert c_ids.shape == c_att.shape == (5, width) and key_tokens.chosen_mask.shape == (5, width - 1)
    assert key_tokens.rejected_mask.shape == (5, r_ids.shape[1] - 1)
    for i, it in enumerate(items):
        n = it[0].shape[1]
        assert c_ids[i, :n].tolist() == it[0][0].tolist()
        assert (c_ids[i, n:] == tokenizer.pad_token_id).all() and not c_att[i, n:].any() and c_att[i, :n].all()
        assert torch.equal(key_tokens.chosen_mask[i, : n - 1], it[5][0]) and not key_tokens.chosen_mask[i, n - 1 :].any()


@pytest.mark.parametrize("exclude", [True, False])
def test_global_selection_thresholds_the_whole_data_set(tiny_pairs, tmp_path, write_score_dir, exclude):
    tokenizer, rows = tiny_pairs
    rows = rows[:6]
    starts = [first_eligible(p, c, r, "chosen", exclude) for p, c, r in rows]

    # chosen row 0 is strong (all high scores), row 1 weak (all far below everyone): global gives 0 a larger
    # share than k and keeps row 1 non-empty with its single best token.
    def scores(ids, prompt_len, side):
        base = id_score(ids, prompt_len, side)
        row = next(i for i, r in enumerate(rows) if r[1] == ids or r[2] == ids)
        if side == "chosen" and row == 0:
            return [10 + s for s in base]
        if side == "chosen" and row == 1:
            return [-10 + s for s in base]
        return base

    score_dir = write_score_dir(str(tmp_path), tokenizer, rows, scores)
    k = 0.3
    ds = TokenScoreDataset(score_dir, tokenizer, 128, k_chosen=k, k_rejected=k, selection="global",
                           exclude_common_prefix=exclude)

    flat = [(s, row, j) for row, (p, c, r) in enumerate(rows) for j, s in enumerate(scores(c, p, "chosen"))
            if j >= starts[row]]
    n = max(1, math.floor(k * len(flat) + 1e-9))
    expected = {(row, j) for s, row, j in sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:n]}
    for row, (p, c, r) in enumerate(rows):
        if not any(er == row for er, _ in expected):
            s = scores(c, p, "chosen")[starts[row]:]
            expected.add((row, starts[row] + s.index(max(s))))
    got = set()
    for row in range(len(rows)):
        p = rows[row][0]
        got |= {(row, t + 1 - p) for t in ds[row][5][0].nonzero().flatten().tolist()}
    assert got == expected
    counts = [int(ds[row][5].sum()) for row in range(len(rows))]
    eligible = [len(c) - p - start for (p, c, _), start in zip(rows, starts)]
    assert counts[0] == eligible[0] > k * eligible[0]  # the strong response gives all its eligible tokens
    assert counts[1] == 1  # the weak one is never empty
    assert all(int(ds[row][6].sum()) >= 1 for row in range(len(rows)))


def test_several_dirs_concatenate(tiny_pairs, score_dir, tmp_path, write_score_dir):
    tokenizer, rows = tiny_pairs
    second = write_score_dir(str(tmp_path), tokenizer, rows[:5], id_score)
    ds = TokenScoreDataset(f"{score_dir}, {second}", tokenizer, 128)
    assert len(ds) == len(rows) + 5
    assert ds[len(rows) + 2][0][0].tolist() == rows[2][1]
    assert torch.equal(ds[len(rows) + 2][5], ds[2][5])
    assert len(TokenScoreDataset(f"{score_dir},{second}", tokenizer, 128, max_samples=7)) == 7


def test_missing_dir_is_refused(tiny_pairs, tmp_path):
    with pytest.raises(ScoreDataError, match="does not exist"):
        TokenScoreDataset(str(tmp_path / "nope"), tiny_pairs[0], 128)


def test_tokenizer_mismatch_is_refused(tiny_pairs, tmp_path, write_score_dir):
    tokenizer, rows = tiny_pairs
    bad = write_score_dir(str(tmp_path), tokenizer, rows[:3], id_score, fingerprint="0123456789abcdef")
    with pytest.raises(ScoreDataError, match="fingerprint 0123456789abcdef.*Re-score"):
        TokenScoreDataset(bad, tokenizer, 128)


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_k_outside_unit_interval_is_refused(tiny_pairs, score_dir, k):
    with pytest.raises(ScoreDataError, match=r"k_rejected must be in \(0, 1\]"):
        TokenScoreDataset(score_dir, tiny_pairs[0], 128, k_rejected=k)


def test_bad_rows_are_named(tiny_pairs, tmp_path, write_score_dir):
    tokenizer, rows = tiny_pairs

    def short_scores(ids, prompt_len, side):
        s = id_score(ids, prompt_len, side)
        return s[:-1] if side == "rejected" and ids == rows[2][2] else s

    bad = write_score_dir(str(tmp_path / "len"), tokenizer, rows[:4], short_scores)
    with pytest.raises(ScoreDataError, match=r"1 row\(s\) has len\(rejected_scores\).*row 2 \(index=2\)"):
        TokenScoreDataset(bad, tokenizer, 128)

    def nan_scores(ids, prompt_len, side):
        s = id_score(ids, prompt_len, side)
        return [float("nan")] + s[1:] if ids == rows[1][1] else s

    bad = write_score_dir(str(tmp_path / "nan"), tokenizer, rows[:4], nan_scores)
    with pytest.raises(ScoreDataError, match=r"NaN or infinite chosen_scores: row 1 \(index=1\)"):
        TokenScoreDataset(bad, tokenizer, 128)

    longest = max(len(c) for _, c, _ in rows[:4])
    ok = write_score_dir(str(tmp_path / "long"), tokenizer, rows[:4], id_score)
    with pytest.raises(ScoreDataError, match=f"longer than --data.max_len {longest - 1}"):
        TokenScoreDataset(ok, tokenizer, longest - 1)


def test_format_version_is_checked_and_dirs_from_before_it_load(tiny_pairs, score_dir, tmp_path, write_score_dir):
    tokenizer, rows = tiny_pairs
    out = write_score_dir(str(tmp_path), tokenizer, rows[:4], id_score)
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    assert (manifest["format"], manifest["format_version"]) == ("openrlhf-sepo token scores", 1)
    fresh = TokenScoreDataset(out, tokenizer, 128)
    # A manifest as written before the format fields existed: read as version 1, same items.
    with open(path, "w") as f:
        json.dump({k: v for k, v in manifest.items() if k not in ("format", "format_version")}, f)
    old = TokenScoreDataset(out, tokenizer, 128)
    assert len(old) == len(fresh) == 4
    assert all(torch.equal(a, b) for i in range(4) for a, b in zip(old[i][5:], fresh[i][5:]))
    for field, value in (("format_version", 2), ("format", "someone else's scores")):
        with open(path, "w") as f:
            json.dump({**manifest, field: value}, f)
        with pytest.raises(ScoreDataError, match=f"scores dir {re.escape(repr(out))} is in format .*{value}.* but this openrlhf-sepo "
                                                 "reads 'openrlhf-sepo token scores' version 1"):
            TokenScoreDataset(out, tokenizer, 128)


def test_incomplete_scoring_is_refused(tiny_pairs, score_dir, tmp_path, write_score_dir):
    tokenizer, rows = tiny_pairs
    out = write_score_dir(str(tmp_path), tokenizer, rows[:2], id_score)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["complete"] = False
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ScoreDataError, match="did not complete"):
        TokenScoreDataset(out, tokenizer, 128)


# --- common-prefix exclusion and the random control --------------------------------------------------------------

def cos_score(ids, prompt_len, side):
    """Other scores for the same ids (random selection must not depend on them)."""
    return [math.cos(tok * 0.3) - 2e-3 * j for j, tok in enumerate(ids[prompt_len:])]


@pytest.fixture(scope="module")
def prefix_pairs(tiny_pairs):
    """The tiny pairs rewritten so that every kind of common response prefix occurs, with its kind per row:
    none (P = 0 forced), shared5 (rejected starts with chosen's first 5 response tokens), identical (rejected ==
    chosen), chosen_prefix (chosen is a strict prefix of rejected) and natural (as tokenized)."""
    tokenizer, rows = tiny_pairs
    kinds = ("none", "shared5", "identical", "chosen_prefix", "natural")
    out, row_kinds = [], []
    for i, (p, c, r) in enumerate(rows):
        kind = kinds[i % len(kinds)]
        if kind == "none":
            r = r[:p] + [next(t for t in r[p:] + c[p:] if t != c[p])] + r[p + 1:]
        elif kind == "shared5":
            r = r[:p] + c[p:p + 5] + r[p + 5:]
        elif kind == "identical":
            r = list(c)
        elif kind == "chosen_prefix":
            r = c + r[p:]
        out.append((p, c, r))
        row_kinds.append(kind)
    prefixes = [common_prefix(*row) for row in out]
    # the data has the cases the tests are about
    assert all((P == 0) == (kind == "none") for P, kind in zip(prefixes, row_kinds))
    assert all(P >= 5 for P, kind in zip(prefixes, row_kinds) if kind == "shared5")
    assert all(P == len(c) - p for (p, c, _), P, kind in zip(out, prefixes, row_kinds) if kind in ("identical", "chosen_prefix"))
    return tokenizer, out, row_kinds


@pytest.fixture(scope="module")
def prefix_dirs(prefix_pairs, write_score_dir, tmp_path_factory):
    """Two scores dirs of prefix_pairs: the same ids, scored by id_score and by cos_score."""
    tokenizer, rows, _ = prefix_pairs
    base = tmp_path_factory.mktemp("prefix_scores")
    return (write_score_dir(str(base / "sin"), tokenizer, rows, id_score),
            write_score_dir(str(base / "cos"), tokenizer, rows, cos_score))


def masks(ds):
    """[(chosen positions, rejected positions)] per row, as absolute token positions."""
    return [(selected_positions(ds[i][5]), selected_positions(ds[i][6])) for i in range(len(ds))]


@pytest.mark.parametrize("selection", ["per_response", "global", "random"])
def test_common_prefix_is_never_selected(prefix_pairs, prefix_dirs, selection, capsys):
    tokenizer, rows, kinds = prefix_pairs
    ds = TokenScoreDataset(prefix_dirs[0], tokenizer, 128, k_chosen=0.3, k_rejected=0.3, selection=selection,
                           exclude_common_prefix=True)
    assert ds.common_prefix.tolist() == [common_prefix(*row) for row in rows]
    excluded = sum(first_eligible(*row, side) for row in rows for side in ("chosen", "rejected"))
    with_prefix = sum(common_prefix(*row) > 0 for row in rows)
    assert f"excluded {excluded} response tokens (both sides) as the common prefix of chosen and rejected in " \
           f"{with_prefix}/{len(rows)} pairs" in capsys.readouterr().out
    loss = SePOLoss(beta=1.0)
    for (p, c, r), kind, (c_pos, r_pos) in zip(rows, kinds, masks(ds)):
        for side, ids, pos in (("chosen", c, c_pos), ("rejected", r, r_pos)):
            start = first_eligible(p, c, r, side)
            assert pos and min(pos) >= p + start and max(pos) < len(ids), (kind, side, pos)
            if selection != "global":  # per_response's count over the eligible tokens
                k_n = max(1, math.floor(0.3 * (len(ids) - p - start) + 1e-9))
                assert len(pos) == k_n, (kind, side)
        if kind == "identical":  # only the last token is eligible, on both sides
            assert c_pos == r_pos == {len(c) - 1}
        if kind == "chosen_prefix":
            assert c_pos == {len(c) - 1} and min(r_pos) >= len(c)
        if selection == "per_response":
            assert c_pos == expected_per_response(c, p, 0.3, True, first_eligible(p, c, r, "chosen"))
            assert r_pos == expected_per_response(r, p, 0.3, False, first_eligible(p, c, r, "rejected"))
    # an identical pair trains on a finite loss (no empty selection, no NaN)
    i = kinds.index("identical")
    c_ids, _, r_ids, _, extra = ds.collate_fn([ds[i]])
    logps = torch.randn(1, c_ids.shape[1] - 1)
    value, _, _ = loss(logps, logps.clone(), extra.chosen_mask, extra.rejected_mask)
    assert torch.isfinite(value)


@pytest.mark.parametrize("selection", ["per_response", "random"])
def test_pairs_without_common_prefix_are_unchanged(prefix_pairs, prefix_dirs, selection):
    tokenizer, rows, kinds = prefix_pairs
    on, off = (masks(TokenScoreDataset(prefix_dirs[0], tokenizer, 128, selection=selection,
                                       exclude_common_prefix=exclude)) for exclude in (True, False))
    none = [i for i, kind in enumerate(kinds) if kind == "none"]
    assert none and all(on[i] == off[i] for i in none)
    assert any(on[i] != off[i] for i in range(len(rows)) if kinds[i] == "shared5")  # the others do change


@pytest.mark.parametrize("selection", ["per_response", "global", "random"])
def test_data_without_common_prefix_is_unchanged(prefix_pairs, write_score_dir, tmp_path, selection):
    tokenizer, rows, kinds = prefix_pairs
    rows = [row for row, kind in zip(rows, kinds) if kind == "none"]
    out = write_score_dir(str(tmp_path), tokenizer, rows, id_score)
    on, off = (TokenScoreDataset(out, tokenizer, 128, selection=selection, exclude_common_prefix=exclude)
               for exclude in (True, False))
    assert masks(on) == masks(off)


def test_keep_common_prefix_is_the_old_selection(prefix_pairs, prefix_dirs):
    """exclude_common_prefix=False: each response's mask is select_key_tokens over all its scores, as before."""
    tokenizer, rows, _ = prefix_pairs
    ds = TokenScoreDataset(prefix_dirs[0], tokenizer, 128, k_chosen=0.3, k_rejected=0.5, exclude_common_prefix=False)
    for (p, c, r), (c_pos, r_pos) in zip(rows, masks(ds)):
        for ids, pos, k, largest in ((c, c_pos, 0.3, True), (r, r_pos, 0.5, False)):
            old = select_key_tokens(torch.tensor(id_score(ids, p, None), dtype=torch.float64), k, largest)
            assert pos == {p + j for j in old.nonzero().flatten().tolist()}


def test_random_selection_contract(prefix_pairs, prefix_dirs):
    tokenizer, rows, kinds = prefix_pairs

    def build(dir_index=0, seed=0, selection="random", exclude=True):
        return TokenScoreDataset(prefix_dirs[dir_index], tokenizer, 128, k_chosen=0.3, k_rejected=0.4,
                                 selection=selection, seed=seed, exclude_common_prefix=exclude)

    first = build()
    got = masks(first)
    # per_response's count per response, with and without exclusion
    for exclude in (True, False):
        counts = [(len(c), len(r)) for c, r in masks(build(exclude=exclude))]
        assert counts == [(len(c), len(r)) for c, r in masks(build(selection="per_response", exclude=exclude))]
    assert masks(build()) == got  # deterministic for a seed
    assert masks(build(dir_index=1)) == got  # independent of the scores
    assert masks(build(seed=1)) != got  # another seed, another draw
    assert masks(build(selection="per_response")) != got  # not the oracle's choice
    # never the prompt, the common prefix, or past the response; drawn per side and per row
    for (p, c, r), (c_pos, r_pos) in zip(rows, got):
        assert min(c_pos) >= p + first_eligible(p, c, r, "chosen") and max(c_pos) < len(c)
        assert min(r_pos) >= p + first_eligible(p, c, r, "rejected") and max(r_pos) < len(r)
    natural = [i for i, kind in enumerate(kinds) if kind in ("natural", "none")]
    assert any(got[i][0] != got[i][1] for i in natural)
    relative = [frozenset(j - rows[i][0] for j in got[i][0]) for i in natural]
    assert len(set(relative)) > 1
    # batches: padding of a collated batch is never selected
    c_ids, c_att, r_ids, r_att, extra = first.collate_fn([first[i] for i in range(6)])
    for mask, att in ((extra.chosen_mask, c_att), (extra.rejected_mask, r_att)):
        assert not (mask & ~att[:, 1:].bool()).any()
        assert not any(mask[i, : first[i][4] - 1].any() for i in range(6))


def test_select_key_tokens_with_eligible_mask():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 30, (5,), generator=gen)
        scores = torch.randn(5, 30, generator=gen)
        starts = (torch.rand(5, generator=gen) * lengths).long()  # start < length: at least one eligible
        eligible = torch.arange(30).unsqueeze(0) >= starts.unsqueeze(1)
        for k in (0.1, 0.3, 1.0):
            for largest in (True, False):
                mask = select_key_tokens(scores, k, largest, lengths, eligible)
                for i, (n, s) in enumerate(zip(lengths.tolist(), starts.tolist())):
                    assert int(mask[i].sum()) == max(1, math.floor(k * (n - s) + 1e-9))
                    assert not mask[i, :s].any() and not mask[i, n:].any()
                    sub = select_key_tokens(scores[i, s:n], k, largest)  # the eligible tokens alone
                    assert torch.equal(mask[i, s:n], sub)
        # every token eligible: exactly the plain selection
        full = torch.ones(5, 30, dtype=torch.bool)
        assert torch.equal(select_key_tokens(scores, 0.3, True, lengths, full), select_key_tokens(scores, 0.3, True, lengths))
    # an ineligible earlier position never wins over an eligible token with an infinite key
    inf = float("inf")
    mask = select_key_tokens(torch.tensor([[0.0, -inf, -inf]]), 0.5, False, eligible=torch.tensor([[False, True, True]]))
    assert mask.tolist() == [[False, True, False]]
    mask = select_key_tokens(torch.tensor([[5.0, 1.0]]), 1.0, True, eligible=torch.tensor([[False, False]]))
    assert not mask.any()  # no eligible token: nothing selected

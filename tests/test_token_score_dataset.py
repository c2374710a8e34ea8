"""TokenScoreDataset: masks land exactly on the selected tokens in log-prob layout (both modes), batches pad
like OpenRLHF's, and bad score dirs are refused with a message naming the dir, the row or the setting."""

import json
import math
import os

import pytest
import torch

from openrlhf_sepo.datasets import KeyTokens, ScoreDataError, TokenScoreDataset


def id_score(ids, prompt_len, side):
    """Each token's score is a function of its own id (and, to break most ties, its position)."""
    return [math.sin(tok * 1.7) + 1e-3 * j for j, tok in enumerate(ids[prompt_len:])]


@pytest.fixture(scope="module")
def score_dir(tiny_pairs, write_score_dir, tmp_path_factory):
    tokenizer, rows = tiny_pairs
    return write_score_dir(str(tmp_path_factory.mktemp("scores")), tokenizer, rows, id_score)


def expected_per_response(ids, prompt_len, k, largest):
    """Absolute positions the paper's rule selects, by a plain sort (independent of select_key_tokens)."""
    scores = id_score(ids, prompt_len, None)
    n = max(1, math.floor(k * len(scores) + 1e-9))
    order = sorted(range(len(scores)), key=lambda j: (-scores[j] if largest else scores[j], j))
    return {prompt_len + j for j in order[:n]}


@pytest.mark.parametrize("k_chosen,k_rejected", [(0.3, 0.3), (0.5, 0.1), (1.0, 1.0)])
def test_per_response_masks_land_on_selected_tokens(tiny_pairs, score_dir, k_chosen, k_rejected):
    tokenizer, rows = tiny_pairs
    ds = TokenScoreDataset(score_dir, tokenizer, 128, k_chosen=k_chosen, k_rejected=k_rejected)
    assert len(ds) == len(rows)
    for idx in range(len(rows)):
        prompt_len, chosen, rejected = rows[idx]
        c_ids, c_att, r_ids, r_att, p, c_sel, r_sel = ds[idx]
        assert p == prompt_len and c_ids[0].tolist() == chosen and r_ids[0].tolist() == rejected
        assert c_sel.shape == (1, len(chosen) - 1) and r_sel.shape == (1, len(rejected) - 1)
        # log-prob layout: entry t is log p(ids[t+1]) -> the selected token is ids[t+1]
        assert {t + 1 for t in c_sel[0].nonzero().flatten().tolist()} == expected_per_response(chosen, p, k_chosen, True)
        assert {t + 1 for t in r_sel[0].nonzero().flatten().tolist()} == expected_per_response(rejected, p, k_rejected, False)
        assert not c_sel[0, : p - 1].any()  # prompt never selected
        # the shift checked against the ids: the scores recomputed from the ids at t + 1 are the n highest
        selected = c_sel[0].nonzero().flatten().tolist()
        from_ids = sorted(math.sin(c_ids[0, t + 1].item() * 1.7) + 1e-3 * (t + 1 - p) for t in selected)
        assert from_ids == sorted(id_score(chosen, p, None))[-len(selected):]


def test_all_tokens_mask_is_openrlhf_response_mask(tiny_pairs, score_dir):
    """k = 1: the selection is exactly the response mask OpenRLHF's DPOTrainer._get_batch_logps builds."""
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    tokenizer, rows = tiny_pairs
    ds = TokenScoreDataset(score_dir, tokenizer, 128, k_chosen=1.0, k_rejected=1.0)
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


def test_global_selection_thresholds_the_whole_data_set(tiny_pairs, tmp_path, write_score_dir):
    tokenizer, rows = tiny_pairs
    rows = rows[:6]

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
    ds = TokenScoreDataset(score_dir, tokenizer, 128, k_chosen=k, k_rejected=k, selection="global")

    flat = [(s, row, j) for row, (p, c, r) in enumerate(rows) for j, s in enumerate(scores(c, p, "chosen"))]
    n = max(1, math.floor(k * len(flat) + 1e-9))
    expected = {(row, j) for s, row, j in sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:n]}
    for row, (p, c, r) in enumerate(rows):
        if not any(er == row for er, _ in expected):
            s = scores(c, p, "chosen")
            expected.add((row, s.index(max(s))))
    got = set()
    for row in range(len(rows)):
        p = rows[row][0]
        got |= {(row, t + 1 - p) for t in ds[row][5][0].nonzero().flatten().tolist()}
    assert got == expected
    counts = [int(ds[row][5].sum()) for row in range(len(rows))]
    responses = [len(c) - p for p, c, _ in rows]
    assert counts[0] == responses[0] > k * responses[0]  # the strong response gives all its tokens
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

"""--sepo.selection confidence (ConfPO): the rule on hand-made log-probs (ties, a token at the mean, all equal, one
token), determinism, masks on response tokens only (never prompt or padding) through the trainer's step on
OpenRLHF's RewardDataset batches of preference data, the same selection and loss through both policy forwards, a
scores dir read the same way, clear refusals of the flag combinations it cannot take, and one tiny train_sepo run."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sepo.scoring import low_confidence_tokens

TINY = ["--data.max_len", "128", "--train.batch_size", "8", "--train.micro_batch_size", "4", "--adam.lr", "1e-3"]
CHAT = ["--data.apply_chat_template"]  # the tiny UltraFeedback-shaped pairs: message lists, no prompt column


def logps_of(probs, dtype=torch.float64):
    return torch.tensor([[math.log(p) if p > 0 else -math.inf for p in row] for row in probs], dtype=dtype)


def plain_rule(probs, eligible):
    """ConfPO's rule by a plain loop: the eligible positions whose probability is below the eligible mean, or all
    eligible positions when none is."""
    out = []
    for row_p, row_e in zip(probs, eligible):
        kept = [p for p, e in zip(row_p, row_e) if e]
        tau = sum(kept) / len(kept)
        chosen = [bool(e) and p < tau for p, e in zip(row_p, row_e)]
        out.append(chosen if any(chosen) else [bool(e) for e in row_e])
    return out


def test_rule_on_hand_made_probabilities():
    probs = [
        [0.5, 0.1, 0.3, 0.1],   # mean 0.25: the two 0.1 (tied) are selected, 0.3 and 0.5 are not
        [0.4, 0.2, 0.2, 0.2],   # mean 0.25: every tied 0.2 is selected
        [1.0, 0.0, 0.5, 0.5],   # mean 0.5 exactly: the tokens at the mean are not selected (strictly below)
        [0.3, 0.3, 0.3, 0.3],   # all equal: nothing is strictly below the mean -> every response token
        [0.9, 0.7, 0.05, 0.6],  # one token far below
    ]
    eligible = torch.ones(len(probs), 4, dtype=torch.bool)
    mask = low_confidence_tokens(logps_of(probs), eligible)
    assert mask.tolist() == [
        [False, True, False, True],
        [False, True, True, True],
        [False, True, False, False],
        [True, True, True, True],
        [False, False, True, False],
    ]
    assert mask.tolist() == plain_rule(probs, eligible.tolist())


def test_ineligible_positions_are_never_selected_nor_in_the_mean():
    # row 0: a prompt (positions 0-1, very unlikely tokens) then 3 response tokens; row 1: a one-token response
    # then padding. Neither the prompt nor the padding may be selected or move the threshold.
    probs = [[1e-6, 1e-6, 0.9, 0.2, 0.4], [0.01, 0.7, 1e-9, 1e-9, 1e-9]]
    eligible = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    mask = low_confidence_tokens(logps_of(probs, torch.float32), eligible)
    # row 0: mean of 0.9, 0.2, 0.4 = 0.5 -> 0.2 and 0.4; row 1: its one token, alone, is its own mean -> kept
    assert mask.tolist() == [[False, False, False, True, True], [False, True, False, False, False]]
    assert not (mask & ~eligible).any()


def test_rule_matches_a_plain_loop_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    logps = torch.randn(16, 40, generator=g).mul(2).log_softmax(-1) + torch.randn(16, 40, generator=g)
    logps = logps.clamp(max=0)
    eligible = torch.rand(16, 40, generator=g) < 0.6
    eligible[:, 7] = True  # no empty row
    eligible[3] = False
    eligible[3, 5] = True  # a one-token response
    logps[4] = -0.7  # all equal
    mask = low_confidence_tokens(logps, eligible)
    probs = logps.double().exp().tolist()
    assert mask.tolist() == plain_rule(probs, eligible.tolist())
    assert mask[3].nonzero().flatten().tolist() == [5] and torch.equal(mask[4], eligible[4])
    assert torch.equal(low_confidence_tokens(logps.clone(), eligible.clone()), mask)  # same inputs, same masks
    perm = torch.randperm(16, generator=g)  # a row's mask depends on that row alone
    assert torch.equal(low_confidence_tokens(logps[perm], eligible[perm]), mask[perm])
    assert (mask.sum(-1) >= 1).all() and not (mask & ~eligible).any()


def test_selection_carries_no_gradient():
    logps = torch.randn(2, 6).log_softmax(-1).requires_grad_()
    mask = low_confidence_tokens(logps, torch.ones(2, 6, dtype=torch.bool))
    assert mask.dtype == torch.bool and not mask.requires_grad


# --- the step ------------------------------------------------------------------------------------------------------

def parse(tiny_dir, dataset, *flags):
    from openrlhf_sepo.cli import train_sepo

    return train_sepo.parse_args(["--model.model_name_or_path", os.path.join(tiny_dir, "base"),
                                  "--data.dataset", dataset, *TINY, *flags])


@pytest.fixture(scope="module")
def raw_batch(tiny_dir, tiny_pairs):
    """A batch of OpenRLHF's RewardDataset(is_dpo=True), built by train_sepo's own data path for preference data
    (--sepo.selection confidence), with rows of different prompt and response lengths (so padding is present)."""
    from openrlhf_sepo.cli import train_sepo
    from openrlhf_sepo.rows import DataStrategy

    tokenizer, pairs = tiny_pairs
    args = parse(tiny_dir, os.path.join(tiny_dir, "pairs.jsonl"), "--sepo.selection", "confidence", *CHAT)
    dataset = train_sepo.score_dataset(args, tokenizer, DataStrategy(args.data, quiet=True))
    from openrlhf.datasets import RewardDataset

    assert type(dataset) is RewardDataset and len(dataset) == len(pairs)
    rows = [0, 1, 2, 5]
    for i in rows:  # the ids train_dpo would train (conftest's RewardDataset, built there by hand)
        chosen, _, rejected, _, prompt_len = dataset[i]
        assert (prompt_len, chosen[0].tolist(), rejected[0].tolist()) == pairs[i]
    batch = dataset.collate_fn([dataset[i] for i in rows])
    assert isinstance(batch[4], list)  # OpenRLHF's prompt lengths, no masks
    return batch


def shell_trainer(tokenizer, confidence=True, nll=False, selected_only=True, beta=2.0):
    """A SelectiveDPOTrainer holding only what the step reads (fit() itself runs in the end-to-end test)."""
    from openrlhf_sepo.loss import SePOLoss
    from openrlhf_sepo.trainer import NoReferenceModel, SelectiveDPOTrainer

    trainer = object.__new__(SelectiveDPOTrainer)
    trainer.tokenizer, trainer.ref_model, trainer._step_logs, trainer.nll_loss = tokenizer, NoReferenceModel(), {}, nll
    trainer.strategy = SimpleNamespace(ring_attn_group=None)
    trainer.confidence, trainer.selected_positions_only, trainer.beta = confidence, selected_only, beta
    trainer.sepo_loss = SePOLoss(beta)
    return trainer


def step(trainer, actor, batch):
    """One fit()-like step: policy forward, the reference slot, the loss; -> (loss, masks SePOLoss saw, positions
    where the LM head ran (or None), per-token log-probs)."""
    c_ids, c_att, r_ids, r_att, extra = batch
    seen, computed = {}, []
    loss_fn = trainer.sepo_loss

    def spy(chosen, rejected, c_mask, r_mask):
        seen.update(chosen=c_mask.clone(), rejected=r_mask.clone())
        return loss_fn(chosen, rejected, c_mask, r_mask)

    trainer.sepo_loss = spy
    logps_at = type(trainer)._logps_at
    trainer._logps_at = lambda model, ids, att, selected: computed.append(selected.clone()) or logps_at(
        trainer, model, ids, att, selected)
    try:
        chosen, rejected, _, _ = trainer.concatenated_forward(actor, c_ids, c_att, r_ids, r_att, extra)
        ref = trainer.concatenated_forward(trainer.ref_model, c_ids, c_att, r_ids, r_att, extra)
        loss, _, _ = trainer._loss(chosen, rejected, ref[0], ref[1])
    finally:
        trainer.sepo_loss = loss_fn
        del trainer._logps_at
    return loss, seen, (computed[0] if computed else None), (chosen, rejected)


@pytest.fixture(scope="module")
def actor(tiny_dir):
    from openrlhf.models import Actor

    return Actor(os.path.join(tiny_dir, "base"), attn_implementation="sdpa", param_dtype="bf16").float()


def response_positions(att, prompt_lens, width):
    """[B, width] log-prob layout: entry t is a response token iff ids[t+1] is attended and t+1 >= prompt length."""
    out = torch.zeros(att.shape[0], width, dtype=torch.bool)
    for i, p in enumerate(prompt_lens):
        n = int(att[i].sum())
        out[i, p - 1 : n - 1] = True
    return out


@pytest.mark.parametrize("selected_only", [True, False])
def test_step_selects_low_confidence_response_tokens_only(tiny_pairs, raw_batch, actor, selected_only):
    """The masks SePOLoss receives are ConfPO's rule on the step's own log-probs over each response, never a
    prompt or padding position; the LM head ran at the whole response of both sides (selected-positions path)."""
    tokenizer, _ = tiny_pairs
    c_ids, c_att, r_ids, r_att, prompt_lens = raw_batch
    trainer = shell_trainer(tokenizer, selected_only=selected_only)
    with torch.no_grad():
        loss, seen, computed, (chosen, rejected) = step(trainer, actor, raw_batch)
    width = max(c_ids.shape[1], r_ids.shape[1]) - 1
    responses = {side: response_positions(torch.nn.functional.pad(att, (0, width + 1 - att.shape[1])), prompt_lens,
                                          width) for side, att in (("chosen", c_att), ("rejected", r_att))}
    assert len(set(c_att.sum(-1).tolist())) > 1 and len(set(r_att.sum(-1).tolist())) > 1  # padding on some rows
    for side, logps in (("chosen", chosen), ("rejected", rejected)):
        mask, response = seen[side], responses[side]
        assert not (mask & ~response).any()  # never the prompt or the padding
        assert mask.tolist() == plain_rule(logps.double().exp().tolist(), response.tolist())
        assert ((mask.sum(-1) >= 1) & (mask.sum(-1) < response.sum(-1))).all()  # a real subset on these rows
    assert torch.isfinite(loss)
    if selected_only:
        assert torch.equal(computed, torch.cat([responses["chosen"], responses["rejected"]]))
    logs = trainer._step_logs
    c_n, r_n = seen["chosen"].sum().item(), seen["rejected"].sum().item()
    c_total, r_total = responses["chosen"].sum().item(), responses["rejected"].sum().item()
    assert logs["chosen_selected_frac"] == pytest.approx(c_n / c_total)
    assert logs["rejected_selected_frac"] == pytest.approx(r_n / r_total)
    assert logs["selected_frac"] == pytest.approx((c_n + r_n) / (c_total + r_total))


def test_both_policy_forwards_give_the_same_selection_loss_and_gradients(tiny_pairs, raw_batch, actor):
    tokenizer, _ = tiny_pairs
    results = []
    for selected_only in (True, False):
        actor.zero_grad()
        loss, seen, _, _ = step(shell_trainer(tokenizer, selected_only=selected_only), actor, raw_batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])
        results.append((loss.item(), seen, grads))
    (loss_fast, seen_fast, g_fast), (loss_full, seen_full, g_full) = results
    assert torch.equal(seen_fast["chosen"], seen_full["chosen"])
    assert torch.equal(seen_fast["rejected"], seen_full["rejected"])
    assert loss_fast == pytest.approx(loss_full, abs=1e-5, rel=1e-4)
    torch.testing.assert_close(g_fast, g_full, atol=1e-5, rtol=1e-4)
    actor.zero_grad()


def test_scores_dir_is_read_as_every_response_token_and_gives_the_same_step(tiny_dir, tiny_pairs, raw_batch, actor,
                                                                            write_score_dir, tmp_path):
    """A scores dir with --sepo.selection confidence: the scores are not used (masks = every response token), and the
    step selects exactly as on the same pairs read as preference data."""
    from openrlhf_sepo.cli import train_sepo
    from openrlhf_sepo.datasets import KeyTokens, TokenScoreDataset

    tokenizer, pairs = tiny_pairs
    scores = write_score_dir(str(tmp_path / "scores"), tokenizer, pairs,
                             lambda ids, p, side: [math.sin(t) for t in ids[p:]])
    args = parse(tiny_dir, scores, "--sepo.selection", "confidence", "--sepo.k_chosen", "0.1")
    dataset = train_sepo.score_dataset(args, tokenizer, None)
    assert type(dataset) is TokenScoreDataset and dataset.selection == "confidence"
    batch = dataset.collate_fn([dataset[i] for i in (0, 1, 2, 5)])
    key_tokens = batch[4]
    assert isinstance(key_tokens, KeyTokens) and key_tokens.chosen_nll_skip is None
    width = batch[0].shape[1] - 1
    assert torch.equal(key_tokens.chosen_mask, response_positions(batch[1], key_tokens.prompt_id_lens, width))
    for got, want in zip(batch[:4], raw_batch[:4]):
        assert torch.equal(got, want)
    with torch.no_grad():
        loss_scores, seen_scores, _, _ = step(shell_trainer(tokenizer), actor, batch)
        loss_raw, seen_raw, _, _ = step(shell_trainer(tokenizer), actor, raw_batch)
    assert loss_scores.item() == loss_raw.item()
    assert torch.equal(seen_scores["chosen"], seen_raw["chosen"])
    assert torch.equal(seen_scores["rejected"], seen_raw["rejected"])


def test_score_selections_refuse_a_batch_without_masks(tiny_pairs, raw_batch):
    tokenizer, _ = tiny_pairs
    trainer = shell_trainer(tokenizer, confidence=False)
    c_ids, c_att, r_ids, r_att, prompt_lens = raw_batch
    with pytest.raises(ValueError, match="needs --sepo.selection confidence"):
        trainer.concatenated_forward(trainer.ref_model, c_ids, c_att, r_ids, r_att, prompt_lens)


# --- flags ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scores(tiny_pairs, write_score_dir, tmp_path_factory):
    tokenizer, pairs = tiny_pairs
    return write_score_dir(str(tmp_path_factory.mktemp("scores")), tokenizer, pairs,
                           lambda ids, p, side: [0.1] * (len(ids) - p))


@pytest.mark.parametrize("data,flags,message", [
    ("scores", ["--sepo.selection", "confidence", "--sepo.exclude_common_prefix"],
     "--sepo.exclude_common_prefix needs token scores; --sepo.selection confidence"),
    ("scores", ["--sepo.selection", "confidence", "--sepo.nll_skip_bad"],
     "--sepo.nll_skip_bad needs token scores; --sepo.selection confidence"),
    ("pairs", ["--sepo.selection", "confidence", "--sepo.exclude_common_prefix"],
     "--sepo.exclude_common_prefix needs token scores"),
    ("pairs", [], "--data.dataset: "),  # preference data needs the confidence selection
    ("pairs", ["--sepo.selection", "random"], "preference data is read only with --sepo.selection confidence"),
    ("scores", ["--data.apply_chat_template"], "--data.apply_chat_template applies to preference data"),
    ("scores", ["--sepo.selection", "confidence", "--data.prompt_key", "prompt"],
     "--data.prompt_key applies to preference data (--sepo.selection confidence), not to a scores dir"),
    ("mixed", ["--sepo.selection", "confidence"], "--data.dataset mixes scores dirs and preference data"),
    ("missing", ["--sepo.selection", "confidence"],
     "--data.dataset: preference data file '/nonexistent/pairs.jsonl' does not exist"),
])
def test_bad_combinations_are_refused_naming_the_flag(tiny_dir, scores, capsys, data, flags, message):
    pairs = os.path.join(tiny_dir, "pairs.jsonl")
    dataset = {"scores": scores, "pairs": pairs, "mixed": f"{scores},{pairs}", "missing": "/nonexistent/pairs.jsonl"}[data]
    with pytest.raises(SystemExit) as exit_info:
        parse(tiny_dir, dataset, *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_confidence_takes_preference_data_with_train_dpo_flags_and_ignores_k(tiny_dir, scores):
    pairs = os.path.join(tiny_dir, "pairs.jsonl")
    args = parse(tiny_dir, pairs, "--sepo.selection", "confidence", *CHAT, "--data.dataset_split", "train",
                 "--eval.dataset", scores, "--sepo.k_chosen", "0.5")
    assert args.sepo.selection == "confidence" and args.data.apply_chat_template
    from openrlhf_sepo.cli import train_sepo

    assert not train_sepo.reads_scores(args) and train_sepo.reads_scores(args, evaluation=True)


@pytest.mark.slow
def test_train_sepo_confidence_end_to_end_on_preference_data(tiny_dir, run, tb_scalars, tmp_path):
    """One tiny train_sepo run with --sepo.selection confidence on the raw pairs (no scores dir), one CPU rank:
    finite loss, the selected shares logged per side (strictly between 0 and 1: a real selection), the default NLL
    term, and OpenRLHF's evaluation on the same kind of data."""
    pairs, tb = os.path.join(tiny_dir, "pairs.jsonl"), str(tmp_path / "tb")
    proc = run("openrlhf_sepo.cli.train_sepo", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", pairs, *CHAT, *TINY,
        "--sepo.selection", "confidence", "--ds.attn_implementation", "sdpa", "--ckpt.output_dir",
        str(tmp_path / "out"), "--ckpt.path", str(tmp_path / "ckpt"), "--logger.tensorboard_dir", tb,
        "--eval.dataset", pairs, "--eval.steps", "3"])
    assert f"loaded {pairs} with data_files" in proc.stdout  # read by OpenRLHF's blending_datasets, no scores dir
    logs = tb_scalars(tb)
    steps = [1, 2, 3, 4, 5, 6]  # 48 pairs, batch 8
    for metric in ("loss", "acc", "chosen_logps", "rejected_logps", "margin", "selected_frac", "chosen_selected_frac",
                   "rejected_selected_frac", "nll_loss", "grad_norm"):
        values = logs[f"train/{metric}"]
        assert [s for s, _ in values] == steps, metric
        assert all(math.isfinite(v) for _, v in values), metric
    for metric in ("selected_frac", "chosen_selected_frac", "rejected_selected_frac"):
        assert all(0 < v < 1 for _, v in logs[f"train/{metric}"]), metric
    assert "train/nll_skipped_frac" not in logs
    assert [s for s, _ in logs["eval/eval_loss"]] == [3, 6]
    assert all(math.isfinite(v) for _, v in logs["eval/eval_loss"])
    assert os.path.isfile(os.path.join(tmp_path, "out", "config.json"))

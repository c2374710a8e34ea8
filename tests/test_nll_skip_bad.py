"""--sepo.nll_skip_bad: the skip rule on hand-made scores (bottom-k_rejected share AND below 0; nothing skipped without
a negative score), exactly the bad key words of the chosen answer with the planted truth as scores, the NLL over the
kept tokens against an independent computation (both policy forwards), the share skipped in the logs, the step with
the flag off equal to OpenRLHF's own NLL, and one tiny train_sepo run that logs the share."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sepo.scoring import bad_key_tokens

TINY = ["--data.max_len", "128", "--train.batch_size", "8", "--train.micro_batch_size", "4", "--adam.lr", "1e-3"]


@pytest.mark.parametrize("scores,k,skipped", [
    ([1.0, 0.0, -1.0, 0.0, -1.0, 0.5], 0.5, [2, 4]),  # n = 3 lowest: -1, -1 and the first 0, which is not < 0
    ([-1.0, -2.0, -3.0, 1.0], 0.3, [2]),             # n = max(1, floor(1.2)) = 1: only the lowest of three negatives
    ([-1.0, -2.0, -3.0, 1.0], 1.0, [0, 1, 2]),       # n = N: every negative
    ([0.3, 0.0, 1.0, 2.0], 1.0, []),                 # no negative score: nothing skipped, whatever k
    ([-0.5, -0.5, -0.5, 0.2], 0.5, [0, 1]),          # ties go to the earlier positions
])
def test_skip_rule_on_hand_made_scores(scores, k, skipped):
    mask = bad_key_tokens(torch.tensor(scores), k)
    assert mask.nonzero().flatten().tolist() == skipped


def test_skip_rule_ignores_padding_and_counts_each_row_alone():
    scores = torch.tensor([[-1.0, 2.0, -3.0, -9.0, -9.0], [0.5, -0.1, 0.0, 0.0, 0.0]])
    mask = bad_key_tokens(scores, 0.5, lengths=torch.tensor([3, 2]))  # row 0: n = 1; row 1: n = 1
    assert mask.tolist() == [[False, False, True, False, False], [False, True, False, False, False]]


@pytest.fixture(scope="module")
def mixed_pairs(tiny_dir, tmp_path_factory):
    """(tokenizer, [(prompt_len, chosen_ids, rejected_ids)]): the embedded task's 'mixed' variant (each chosen
    answer holds one bad key word), tokenized by OpenRLHF's RewardDataset(is_dpo=True)."""
    import datasets
    from openrlhf.datasets import RewardDataset
    from openrlhf.utils import get_tokenizer

    from openrlhf_sepo import tiny
    from openrlhf_sepo.rows import DataStrategy

    path = tiny.write_preference_data(str(tmp_path_factory.mktemp("mixed") / "pairs.jsonl"), n=16, seed=1,
                                      variant="mixed")
    tokenizer = get_tokenizer(os.path.join(tiny_dir, "tokenizer"), None, "right", None)
    data = SimpleNamespace(prompt_key=None, chosen_key="chosen", rejected_key="rejected", apply_chat_template=True,
                           tokenizer_chat_template=None)
    rows = datasets.load_dataset("json", data_files=path, split="train")
    reward = RewardDataset(rows, tokenizer, 128, DataStrategy(data, quiet=True), is_dpo=True, num_processors=1)
    return tokenizer, [(p, c[0].tolist(), r[0].tolist()) for c, _, r, _, p in (reward[i] for i in range(len(reward)))]


def truth_scores(tokenizer):
    """The planted truth per response token: +1 a good key word, -1 a bad one, 0 filler."""
    from openrlhf_sepo.tiny import key_token_signs

    return lambda ids, prompt_len, side: [float(s) for s in key_token_signs(tokenizer.convert_ids_to_tokens(
        ids[prompt_len:]))]


@pytest.fixture(scope="module")
def truth_dir(mixed_pairs, write_score_dir, tmp_path_factory):
    tokenizer, pairs = mixed_pairs
    return write_score_dir(str(tmp_path_factory.mktemp("truth")), tokenizer, pairs, truth_scores(tokenizer))


@pytest.mark.parametrize("selection", ["per_response", "global", "random"])
def test_with_the_planted_truth_the_chosen_bad_key_words_are_skipped(mixed_pairs, truth_dir, selection):
    from openrlhf_sepo.datasets import TokenScoreDataset

    tokenizer, pairs = mixed_pairs
    score = truth_scores(tokenizer)
    ds = TokenScoreDataset(truth_dir, tokenizer, 128, k_rejected=0.3, selection=selection, nll_skip_bad=True)
    for idx, (p, chosen, _) in enumerate(pairs):
        item = ds[idx]
        assert len(item) == 8
        skip = item[7]
        bad = {p + j for j, s in enumerate(score(chosen, p, "chosen")) if s < 0}
        n = max(1, math.floor(0.3 * (len(chosen) - p) + 1e-9))
        assert 1 <= len(bad) <= n  # one bad key word per chosen answer, within the bottom-k share
        assert {t + 1 for t in skip[0].nonzero().flatten().tolist()} == bad  # log-prob layout: entry t -> token t+1
        assert not skip[0, : p - 1].any()
    batch = ds.collate_fn([ds[i] for i in range(4)])
    assert batch[4].chosen_nll_skip.shape == batch[4].chosen_mask.shape


def test_without_the_flag_items_and_batches_are_unchanged(mixed_pairs, truth_dir):
    from openrlhf_sepo.datasets import TokenScoreDataset

    tokenizer, _ = mixed_pairs
    plain = TokenScoreDataset(truth_dir, tokenizer, 128)
    flagged = TokenScoreDataset(truth_dir, tokenizer, 128, nll_skip_bad=True)
    assert len(plain[0]) == 7
    for a, b in zip(plain[3], flagged[3]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert plain.collate_fn([plain[i] for i in range(3)])[4].chosen_nll_skip is None


def shell_trainer(tokenizer, selected_only):
    from openrlhf_sepo.trainer import NoReferenceModel, SelectiveDPOTrainer

    trainer = object.__new__(SelectiveDPOTrainer)
    trainer.tokenizer, trainer.ref_model, trainer._step_logs, trainer.nll_loss = tokenizer, NoReferenceModel(), {}, True
    trainer.strategy = SimpleNamespace(ring_attn_group=None)
    trainer.confidence, trainer.selected_positions_only = False, selected_only
    return trainer


@pytest.fixture(scope="module")
def actor(tiny_dir):
    from openrlhf.models import Actor

    return Actor(os.path.join(tiny_dir, "base"), attn_implementation="sdpa", param_dtype="bf16").float()


def independent_nll(model, ids, att, prompt_lens, skip):
    """-mean over rows of the mean log-prob of the chosen response tokens not in ``skip`` (absolute token positions
    per row), from a plain transformers forward and log_softmax, one row at a time."""
    per_row = []
    for i, p in enumerate(prompt_lens):
        n = int(att[i].sum())
        with torch.no_grad():
            logps = model(ids[i : i + 1, :n]).logits[0, :-1].log_softmax(-1).gather(-1, ids[i, 1:n, None])[:, 0]
        kept = [logps[t - 1] for t in range(p, n) if t not in skip[i]]
        if kept:
            per_row.append(torch.stack(kept).mean())
    return -torch.stack(per_row).mean().item()


@pytest.mark.parametrize("selected_only", [True, False])
def test_nll_over_the_kept_tokens_equals_an_independent_computation(mixed_pairs, truth_dir, actor, selected_only):
    from openrlhf_sepo.datasets import TokenScoreDataset

    tokenizer, _ = mixed_pairs
    ds = TokenScoreDataset(truth_dir, tokenizer, 128, k_rejected=0.3, nll_skip_bad=True)
    rows = [0, 3, 6, 9]
    c_ids, c_att, r_ids, r_att, key_tokens = ds.collate_fn([ds[i] for i in rows])
    skip = [{t + 1 for t in row.nonzero().flatten().tolist()} for row in key_tokens.chosen_nll_skip]
    assert all(skip)
    trainer = shell_trainer(tokenizer, selected_only)
    with torch.no_grad():
        _, _, _, nll = trainer.concatenated_forward(actor, c_ids, c_att, r_ids, r_att, key_tokens)
        full_nll = trainer.concatenated_forward(actor, c_ids, c_att, r_ids, r_att,
                                                key_tokens._replace(chosen_nll_skip=None))[3]
    expected = independent_nll(actor.model, c_ids, c_att, key_tokens.prompt_id_lens, skip)
    assert nll.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert nll.item() != pytest.approx(full_nll.item(), abs=1e-4)  # the skipped tokens did count before
    empty = [set()] * len(rows)
    assert full_nll.item() == pytest.approx(independent_nll(actor.model, c_ids, c_att, key_tokens.prompt_id_lens,
                                                            empty), abs=1e-5, rel=1e-5)
    response = sum(int(c_att[i].sum()) - p for i, p in enumerate(key_tokens.prompt_id_lens))
    assert trainer._step_logs["nll_skipped_frac"] == pytest.approx(sum(map(len, skip)) / response)


def test_flag_off_step_is_openrlhf_nll_and_loss(mixed_pairs, truth_dir, actor):
    """Without the flag the step's NLL is OpenRLHF's DPOTrainer.concatenated_forward NLL to the bit (full logits
    path: the very same call), and the total loss of the step is the same with and without a mask that skips
    nothing."""
    from openrlhf.trainer.dpo_trainer import DPOTrainer

    from openrlhf_sepo.datasets import TokenScoreDataset
    from openrlhf_sepo.loss import SePOLoss

    tokenizer, _ = mixed_pairs
    ds = TokenScoreDataset(truth_dir, tokenizer, 128)
    c_ids, c_att, r_ids, r_att, key_tokens = ds.collate_fn([ds[i] for i in range(4)])
    trainer = shell_trainer(tokenizer, selected_only=False)
    with torch.no_grad():
        chosen, rejected, _, nll = trainer.concatenated_forward(actor, c_ids, c_att, r_ids, r_att, key_tokens)
        openrlhf_nll = DPOTrainer.concatenated_forward(trainer, actor, c_ids, c_att, r_ids, r_att,
                                                       key_tokens.prompt_id_lens)[3]
        nothing = key_tokens._replace(chosen_nll_skip=torch.zeros_like(key_tokens.chosen_mask))
        nll_nothing_skipped = trainer.concatenated_forward(actor, c_ids, c_att, r_ids, r_att, nothing)[3]
    assert torch.equal(nll, openrlhf_nll)
    assert "nll_skipped_frac" in trainer._step_logs and trainer._step_logs["nll_skipped_frac"] == 0
    assert nll_nothing_skipped.item() == pytest.approx(nll.item(), abs=1e-6, rel=1e-6)
    ref = trainer.concatenated_forward(trainer.ref_model, c_ids, c_att, r_ids, r_att, key_tokens)
    loss = SePOLoss()(chosen, rejected, ref[0], ref[1])[0] + 1.0 * nll
    loss_nothing = SePOLoss()(chosen, rejected, ref[0], ref[1])[0] + 1.0 * nll_nothing_skipped
    assert loss.item() == pytest.approx(loss_nothing.item(), abs=1e-6)


def test_kept_token_nll_edge_cases():
    from openrlhf_sepo.loss import kept_token_nll

    logps = torch.tensor([[-1.0, -2.0, -math.inf], [-4.0, -1.0, -3.0]], requires_grad=True)
    keep = torch.tensor([[True, True, False], [False, False, False]])
    nll = kept_token_nll(logps, keep)  # row 1 keeps nothing: out of the mean; an unkept -inf stays out
    assert nll.item() == pytest.approx(1.5)
    nll.backward()
    assert logps.grad.tolist() == [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]
    none = kept_token_nll(logps, torch.zeros(2, 3, dtype=torch.bool))
    assert none.item() == 0 and none.requires_grad
    with pytest.raises(ValueError, match="differ in shape"):
        kept_token_nll(logps, keep[:, :2])


def test_flag_needs_the_nll_term(tiny_dir, truth_dir, capsys):
    from openrlhf_sepo.cli import train_sepo

    with pytest.raises(SystemExit):
        train_sepo.parse_args(["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
                               truth_dir, "--sepo.nll_skip_bad", "--model.nll_loss_coef", "0"])
    assert "--sepo.nll_skip_bad shapes the NLL term: it needs --model.nll_loss_coef > 0" in capsys.readouterr().err


@pytest.mark.parametrize("selection", ["per_response", "global", "random"])
def test_flag_reaches_the_dataset(tiny_dir, mixed_pairs, truth_dir, selection):
    from openrlhf_sepo.cli import train_sepo

    tokenizer, _ = mixed_pairs
    args = train_sepo.parse_args(["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
                                  truth_dir, *TINY, "--sepo.selection", selection, "--sepo.nll_skip_bad"])
    ds = train_sepo.score_dataset(args, tokenizer, None)
    assert ds.nll_skip_bad and ds.selection == selection and ds.nll_skip.sum() > 0


@pytest.mark.slow
def test_train_sepo_logs_the_share_skipped(tiny_dir, mixed_pairs, write_score_dir, run, tb_scalars, tmp_path):
    """One tiny train_sepo run (one CPU rank) with --sepo.nll_skip_bad on the planted truth: finite NLL, and the
    share of chosen tokens skipped logged at every step, between 0 and the largest share a batch can have."""
    tokenizer, pairs = mixed_pairs
    scores = write_score_dir(str(tmp_path / "scores"), tokenizer, pairs, truth_scores(tokenizer))
    tb = str(tmp_path / "tb")
    run("openrlhf_sepo.cli.train_sepo", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", scores, *TINY,
        "--sepo.nll_skip_bad", "--ds.attn_implementation", "sdpa", "--ckpt.output_dir", str(tmp_path / "out"),
        "--ckpt.path", str(tmp_path / "ckpt"), "--logger.tensorboard_dir", tb])
    logs = tb_scalars(tb)
    assert [s for s, _ in logs["train/nll_skipped_frac"]] == [1, 2]  # 16 pairs, batch 8
    score = truth_scores(tokenizer)
    shares = [sum(s < 0 for s in score(c, p, "chosen")) / (len(c) - p) for p, c, _ in pairs]
    assert all(0 < v <= max(shares) for _, v in logs["train/nll_skipped_frac"])
    assert all(math.isfinite(v) and v > 0 for _, v in logs["train/nll_loss"])

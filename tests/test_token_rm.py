"""The token-level reward model (token_rm.py, token_rm_data.py, token_rm_trainer.py, cli/train_token_rm.py):
activations, aggregations and ListMLE against hand-computed values, K = 2 equal to Bradley-Terry, tie-breaking,
gradients only at response positions, ranked-list bad input, and train_token_rm end to end on 2 gloo ranks with
evaluation, resume and an HF save that loads again."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from openrlhf_sepo.token_rm import activation, aggregate, list_mle
from openrlhf_sepo.token_rm_trainer import kendall_tau, ordered_pairs

TINY = ["--data.max_len", "128", "--train.micro_batch_size", "4", "--train.batch_size", "8", "--adam.lr", "1e-3",
        "--ds.attn_implementation", "sdpa"]


def softplus(x):
    return math.log1p(math.exp(x))


def test_activations_are_bounded_and_match_their_formulas():
    z = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0])
    r = activation(z, "softplus")
    expected = [softplus(1 - softplus(1 - v)) for v in z.tolist()]
    assert r.tolist() == pytest.approx(expected, rel=1e-5)
    assert r[2].item() == pytest.approx(0.5487, abs=1e-4)
    assert 0 < r.min() and r.max() < softplus(1) + 1e-6 and r.max() > 1.31
    assert activation(z, "sigmoid").tolist() == pytest.approx(torch.sigmoid(z).tolist())
    with pytest.raises(ValueError, match="activation must be one of"):
        activation(z, "relu")


def test_each_aggregation_against_hand_computed_values():
    # list 0: responses of 3 and 2 tokens (Lbar 2.5); list 1: one response of 1 token and one of 3 (Lbar 2)
    r = torch.tensor([[0.2, 0.5, 0.9], [0.4, 0.1, 9.0], [0.7, 9.0, 9.0], [0.3, 0.6, 0.3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]).bool()
    lists = torch.tensor([0, 0, 1, 1])
    tau = 2.0
    rows = [[0.2, 0.5, 0.9], [0.4, 0.1], [0.7], [0.3, 0.6, 0.3]]
    lbar = [2.5, 2.5, 2.0, 2.0]
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = {
        "sum": [sum(x) for x in rows],
        "avg": [lb * sum(x) / len(x) for x, lb in zip(rows, lbar)],
        "softmax": [lb * tau * lse([v / tau for v in x]) for x, lb in zip(rows, lbar)],
        "softmin": [-lb * tau * lse([-v / tau for v in x]) for x, lb in zip(rows, lbar)],
    }
    for kind, values in expected.items():
        assert aggregate(r, mask, lists, kind, tau).tolist() == pytest.approx(values, rel=1e-5), kind
    # softmax is at least the length-scaled mean and softmin at most (equal for a single token)
    assert (aggregate(r, mask, lists, "softmax") >= aggregate(r, mask, lists, "avg")).all()
    assert (aggregate(r, mask, lists, "softmin") <= aggregate(r, mask, lists, "avg")).all()
    with pytest.raises(ValueError, match="no response token"):
        aggregate(r, torch.zeros_like(mask), lists, "avg")
    with pytest.raises(ValueError, match="tau must be > 0"):
        aggregate(r, mask, lists, "softmax", tau=0.0)


def test_list_mle_against_a_hand_computation_and_bradley_terry():
    e = torch.tensor([1.0, 0.3, -0.5, 2.0, -1.0])  # a list of 3 (best first), then a list of 2
    lists = torch.tensor([0, 0, 0, 1, 1])
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    first = (lse([1.0, 0.3, -0.5]) - 1.0) + (lse([0.3, -0.5]) - 0.3) + 0.0
    second = lse([2.0, -1.0]) - 2.0
    assert list_mle(e, lists).item() == pytest.approx((first + second) / 2, rel=1e-6)
    # K = 2: ListMLE is Bradley-Terry, -log sigmoid(e_chosen - e_rejected)
    pairs = torch.tensor([0.7, -0.2, 1.5, 3.0])
    assert list_mle(pairs, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(
        (-F.logsigmoid(torch.tensor(0.9)) - F.logsigmoid(torch.tensor(-1.5))).item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="fewer than 2 responses"):
        list_mle(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_ordered_pairs_and_kendall_tau():
    lists = torch.tensor([0, 0, 0, 1, 1])
    preference = torch.tensor([1.0, 0.5, 0.5, 2.0, 0.0], dtype=torch.float64)  # a tie in list 0
    i, j = ordered_pairs(lists, preference)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (3, 4)]
    # list 0: e orders (0,1) right, (0,2) wrong -> 0; list 1: right -> 1
    tau = kendall_tau(torch.tensor([2.0, 1.0, 3.0, 5.0, 4.0]), lists, preference)
    assert tau.tolist() == [0.0, 1.0]


@pytest.fixture(scope="module")
def list_strategy():
    from openrlhf_sepo.datasets import DataStrategy

    def make(**flags):
        data = dict(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", responses_key="responses",
                    scores_key="scores", input_template=None, apply_chat_template=True, tokenizer_chat_template=None,
                    max_len=128)
        data.update(flags)
        return DataStrategy(SimpleNamespace(**data), quiet=True)

    return make


def lists_dataset(rows, tiny_dir, strategy, seed=0):
    import datasets
    from openrlhf.utils import get_tokenizer

    from openrlhf_sepo.token_rm_data import RankedListDataset

    tokenizer = get_tokenizer(os.path.join(tiny_dir, "tokenizer"), None, "right", None)
    return RankedListDataset(datasets.Dataset.from_list(rows), tokenizer, strategy, seed=seed)


def test_lists_are_sorted_best_first_with_ties_broken_at_random_by_seed(tiny_dir, list_strategy):
    rows = [{"prompt": "Write a short note about the river.",
             "responses": [f"The river is calm. My note is {w} clear kind honest." for w in
                           ("wrong", "accurate", "rude", "vague", "lazy", "sloppy")],
             "scores": [0.5, 1.0, 0.5, 0.5, 0.5, 0.5]}]
    strategy = list_strategy()
    orders = set()
    for seed in range(6):
        ds = lists_dataset(rows, tiny_dir, strategy, seed=seed)
        ids, prompt_len, scores = ds[0]
        assert scores == [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]  # best first, always
        text = ds.tokenizer.decode(ids[0][prompt_len:])
        assert "accurate" in text
        orders.add(tuple(ds.tokenizer.decode(x[prompt_len:]) for x in ids[1:]))
        again = lists_dataset(rows, tiny_dir, strategy, seed=seed)
        assert all(torch.equal(a, b) for a, b in zip(again[0][0], ids))  # deterministic for a seed
    assert len(orders) > 1  # the tied five come in different orders under different seeds


def test_batches_mark_response_positions_and_gradients_reach_only_them(tiny_dir, list_strategy):
    from openrlhf.models import get_llm_for_sequence_regression

    from openrlhf_sepo import tiny
    from openrlhf_sepo.token_rm import token_rewards

    ds = lists_dataset(tiny.make_ranked_lists(4, k=3, seed=3), tiny_dir, list_strategy())
    ids, att, response, layout, info = ds.collate_fn([ds[i] for i in range(len(ds))])
    assert info.sizes == [3] * len(ds) and layout.shape == (ids.shape[0], 2)
    for row, (seq, prompt_len) in enumerate((s, ds[i][1]) for i in range(len(ds)) for s in ds[i][0]):
        assert response[row].nonzero().flatten().tolist() == list(range(prompt_len, len(seq)))
        assert torch.equal(ids[row, : len(seq)], seq) and att[row].sum() == len(seq)

    model = get_llm_for_sequence_regression(os.path.join(tiny_dir, "base"), "critic", init_value_head=True,
                                            param_dtype="bf16", attn_implementation="sdpa").float()
    rewards = token_rewards(model, ids, att, "softplus")
    rewards.retain_grad()
    lists = layout[:, 0].long()
    for kind in ("avg", "sum", "softmax", "softmin"):
        rewards.grad = None
        list_mle(aggregate(rewards, response, lists, kind), lists).backward(retain_graph=True)
        assert (rewards.grad[~response] == 0).all(), kind  # prompt and padding never get gradient
        assert (rewards.grad[response] != 0).float().mean() > 0.9, kind


@pytest.mark.parametrize("row,reason", [
    ({"prompt": "p", "responses": ["The river is calm."], "scores": [1.0]}, "too_few_responses"),
    ({"prompt": "p", "responses": ["a b", "c d"], "scores": [1.0]}, "score_count_mismatch"),
    ({"prompt": "p", "responses": ["a b", "c d"], "scores": [0.5, 0.5]}, "all_tied"),
    ({"prompt": "p", "responses": ["a b", "   "], "scores": [1.0, 0.0]}, "too_few_responses"),
    ({"prompt": "p", "responses": ["a b", "c d"], "scores": [1.0, float("nan")]}, "bad_score"),
    ({"prompt": "p", "responses": ["a b", "c d"], "scores": None}, "missing_key"),
])
def test_bad_lists_are_counted_skips_with_the_row(tiny_dir, list_strategy, row, reason):
    good = {"prompt": "Write a short note about the river.", "responses": ["The river is calm.", "The river is."],
            "scores": [1.0, 0.0]}
    ds = lists_dataset([good, row, good], tiny_dir, list_strategy())
    assert len(ds) == 2 and ds.skipped == {reason: 1}
    assert ds.skip_examples[reason][0].startswith("row 1:")


def test_empty_responses_are_dropped_from_their_list(tiny_dir, list_strategy):
    row = {"prompt": "Write a short note about the river.", "responses": ["The river is calm.", "", "The river."],
           "scores": [1.0, 2.0, 0.0]}
    ds = lists_dataset([row], tiny_dir, list_strategy())
    assert ds.dropped_empty_responses == 1 and ds[0][2] == [1.0, 0.0]


def test_pairs_are_lists_of_two_and_missing_columns_name_the_flag(tiny_dir, list_strategy):
    from openrlhf_sepo import tiny
    from openrlhf_sepo.token_rm_data import ListDataError

    pairs = [{"prompt": r["prompt"], "chosen": [{"role": "user", "content": r["prompt"]},
                                                {"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
             for r in tiny.make_pairs(5, seed=1)]
    ds = lists_dataset(pairs, tiny_dir, list_strategy(prompt_key=None))
    assert ds.kind == "pairs" and len(ds) == 5 and all(ds[i][2] == [1.0, 0.0] for i in range(5))
    ids, _, response, layout, info = ds.collate_fn([ds[i] for i in range(5)])
    assert ids.shape[0] == 10 and info.sizes == [2] * 5 and layout[:, 1].tolist() == [1.0, 0.0] * 5
    assert ds.tokenizer.decode(ids[0][response[0]], skip_special_tokens=True).strip() == tiny.make_pairs(5, 1)[0]["chosen"]
    with pytest.raises(ListDataError, match="--data.responses_key 'responses'.*--data.chosen_key"):
        lists_dataset([{"prompt": "p", "answers": ["a"]}], tiny_dir, list_strategy())
    with pytest.raises(ListDataError, match="need --data.prompt_key"):
        lists_dataset([{"responses": ["a", "b"], "scores": [1, 0]}], tiny_dir, list_strategy(prompt_key=None))


def list_mle_of(model_dir, tiny_dir, rows, list_strategy):
    """ListMLE (avg aggregation) of a saved token RM, or of the base model with a fresh near-zero head."""
    from openrlhf_sepo.token_rm import load_token_rm, token_rewards

    ds = lists_dataset(rows, tiny_dir, list_strategy())
    ids, att, response, layout, _ = ds.collate_fn([ds[i] for i in range(len(ds))])
    model, settings = load_token_rm(model_dir, "fp32")
    with torch.no_grad():
        r = token_rewards(model.eval(), ids, att, settings["activation"])
        return list_mle(aggregate(r, response, layout[:, 0].long(), settings["aggregation"], settings["tau"]),
                        layout[:, 0].long()).item()


@pytest.fixture(scope="module")
def trained_rm(tiny_dir, run, tmp_path_factory):
    """train_token_rm on 2 gloo ranks, ZeRO-2: 48 ranked lists of 4, batch 8 -> 6 steps, eval every 2, a checkpoint
    every 2 steps, TensorBoard logs."""
    from openrlhf_sepo import tiny

    work = tmp_path_factory.mktemp("token_rm")
    paths = SimpleNamespace(lists=tiny.write_ranked_lists(str(work / "lists.jsonl"), 48, k=4, seed=5),
                            eval=tiny.write_ranked_lists(str(work / "eval.jsonl"), 16, k=4, seed=6),
                            out=str(work / "out"), ckpt=str(work / "ckpt"), tb=str(work / "tb"))
    proc = run("openrlhf_sepo.cli.train_token_rm", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", paths.lists,
        "--eval.dataset", paths.eval, "--data.prompt_key", "prompt", "--data.apply_chat_template", *TINY,
        "--train.max_epochs", "1", "--eval.steps", "2", "--ckpt.output_dir", paths.out, "--ckpt.path", paths.ckpt,
        "--ckpt.save_steps", "2", "--logger.tensorboard_dir", paths.tb, "--token_rm.aggregation", "softmax",
    ], nproc=2)
    paths.log = proc.stdout
    return paths


@pytest.mark.slow
def test_two_rank_run_logs_learns_and_saves_a_loadable_token_rm(tiny_dir, trained_rm, tb_scalars, list_strategy):
    from openrlhf_sepo import tiny
    from openrlhf_sepo.token_rm import load_token_rm

    with open(os.path.join(trained_rm.out, "config.json")) as f:
        config = json.load(f)
    assert config["token_rm"] == {"activation": "softplus", "aggregation": "softmax", "tau": 2.0}
    assert config["value_head_prefix"] == "score"
    model, settings = load_token_rm(trained_rm.out, "fp32")
    assert settings["aggregation"] == "softmax" and type(model).__name__ == "CriticModel"

    logs = tb_scalars(trained_rm.tb)
    for metric in ("loss", "acc", "chosen_reward", "reject_reward", "lr", "grad_norm", "loss_mean", "acc_mean",
                   "token_reward_mean", "token_reward_std"):
        values = logs[f"train/{metric}"]
        assert [s for s, _ in values] == [1, 2, 3, 4, 5, 6], metric
        assert all(math.isfinite(v) for _, v in values), metric
    for metric in ("eval_loss", "acc_mean", "kendall_tau"):
        assert [s for s, _ in logs[f"eval/{metric}"]] == [2, 4, 6], metric
    assert all(0 <= v <= 1 for _, v in logs["eval/acc_mean"]) and all(-1 <= v <= 1 for _, v in logs["eval/kendall_tau"])
    assert all(0 < v < softplus(1) for _, v in logs["train/token_reward_mean"])
    # and on the console: the progress bar shows them next to OpenRLHF's loss and acc
    for metric in ("loss", "acc", "token_reward_mean", "token_reward_std"):
        assert f"{metric}=" in trained_rm.log, metric

    # It learned: ListMLE on its training lists fell below the base model's with a fresh head.
    rows = tiny.make_ranked_lists(48, k=4, seed=5)
    base = os.path.join(os.path.dirname(trained_rm.out), "base_rm")
    torch.manual_seed(0)
    from openrlhf.models import get_llm_for_sequence_regression

    fresh = get_llm_for_sequence_regression(os.path.join(tiny_dir, "base"), "critic", init_value_head=True,
                                            param_dtype="bf16", attn_implementation="sdpa")
    fresh.config.value_head_prefix = "score"
    fresh.config.token_rm = config["token_rm"]
    fresh.save_pretrained(base)
    before = list_mle_of(base, tiny_dir, rows, list_strategy)
    after = list_mle_of(trained_rm.out, tiny_dir, rows, list_strategy)
    assert after < before - 0.05, (before, after)


@pytest.mark.slow
def test_resume_continues_at_the_right_step(tiny_dir, trained_rm, run, tb_scalars, tmp_path):
    assert os.path.isdir(os.path.join(trained_rm.ckpt, "global_step4"))
    with open(os.path.join(trained_rm.ckpt, "latest"), "w") as f:
        f.write("global_step4")  # as if the run had stopped after step 4 (32 of 48 lists)
    tb = str(tmp_path / "tb")
    proc = run("openrlhf_sepo.cli.train_token_rm", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", trained_rm.lists,
        "--data.prompt_key", "prompt", "--data.apply_chat_template", *TINY, "--ckpt.path", trained_rm.ckpt,
        "--ckpt.load_enable", "--ckpt.output_dir", str(tmp_path / "out"), "--logger.tensorboard_dir", tb,
        "--token_rm.aggregation", "softmax",
    ], nproc=2)
    assert "consumed_samples: 32" in proc.stdout
    assert [s for s, _ in tb_scalars(tb)["train/loss"]] == [5, 6]


def test_bad_data_stops_before_the_model_loads(tiny_dir, tmp_path, capsys, no_model_loads):
    """In this process, with model loaders that raise (conftest's no_model_loads)."""
    from openrlhf_sepo.cli import train_token_rm

    path = tmp_path / "lists.jsonl"
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}) + "\n")
    assert train_token_rm.main(["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
                                str(path), "--data.prompt_key", "prompt", *TINY]) == 1
    err = capsys.readouterr().err
    assert "train_token_rm: error: --data.dataset: no usable row (skipped by reason: {'all_tied': 1})" in err


@pytest.mark.parametrize("flags,message", [
    (["--token_rm.aggregation", "max"], "argument --token_rm.aggregation: invalid choice: 'max'"),
    (["--token_rm.activation", "relu"], "argument --token_rm.activation: invalid choice: 'relu'"),
    (["--token_rm.tau", "0"], "--token_rm.tau must be > 0"),
])
def test_bad_flags_are_refused(tiny_dir, capsys, flags, message):
    from openrlhf_sepo.cli import train_token_rm

    with pytest.raises(SystemExit) as exit_info:
        train_token_rm.parse_args(["--model.model_name_or_path", "m", "--data.dataset", "d", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_parser_keeps_train_rm_names_and_defaults():
    from openrlhf_sepo.cli import train_token_rm

    defaults = {a.dest: a.default for a in train_token_rm.build_parser()._actions}
    for dest, value in {"train.micro_batch_size": 1, "train.batch_size": 128, "adam.lr": 9e-6, "ds.zero_stage": 2,
                        "data.max_len": 512, "train.max_epochs": 1, "ds.value_head_prefix": "score",
                        "data.chosen_key": "chosen", "data.rejected_key": "rejected", "data.prompt_key": None,
                        "token_rm.activation": "softplus", "token_rm.aggregation": "avg", "token_rm.tau": 2.0}.items():
        assert defaults[dest] == value, dest


@pytest.mark.slow
def test_one_rank_run_on_preference_pairs_scores_into_a_sepo_scores_dir(tiny_dir, run, tmp_path):
    """Ordinary pairs (UltraFeedback shape, chat template, no prompt key) on 1 rank; the saved token RM then scores
    the same pairs (score_tokens --scorer token_rm) into a scores dir that TokenScoreDataset loads for SePO."""
    from openrlhf.utils import get_tokenizer

    from openrlhf_sepo.datasets import TokenScoreDataset

    out, scores = str(tmp_path / "rm"), str(tmp_path / "scores")
    proc = run("openrlhf_sepo.cli.train_token_rm", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
        os.path.join(tiny_dir, "pairs.jsonl"), "--data.apply_chat_template", *TINY, "--ds.zero_stage", "0",
        "--ckpt.output_dir", out, "--token_rm.activation", "sigmoid", "--token_rm.aggregation", "sum"])
    assert "RankedListDataset (--data.dataset): 48 pairs kept of 48 rows, 96 responses (K 2-2)" in proc.stdout
    run("openrlhf_sepo.cli.score_tokens", ["--scorer", "token_rm", "--token_rm.model_name_or_path", out,
                                          "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"),
                                          "--data.apply_chat_template", "--data.max_len", "128", "--output_dir", scores])
    tokenizer = get_tokenizer(os.path.join(tiny_dir, "tokenizer"), None, "right", None)
    dataset = TokenScoreDataset(scores, tokenizer, 128)
    assert len(dataset) == 48
    values = torch.tensor(dataset.data["chosen_scores"][0])
    assert ((0 < values) & (values < 1)).all()  # sigmoid-bounded token rewards

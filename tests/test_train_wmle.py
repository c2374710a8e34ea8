"""Reward-weighted MLE (train_wmle): token weights on hand-computed cases, the dataset's weights in OpenRLHF's
loss-mask layout, the identity that makes OpenRLHF's SFT loss the weighted MLE loss, a 2-rank CPU run through the
launcher (finite logs, an HF checkpoint that lowered the weighted NLL, resume at the right step, eval metrics), and
bad input stopping before any model is loaded."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sepo.scores_dir import ScoreDataError
from openrlhf_sepo.wmle import token_weights
from openrlhf_sepo.wmle_data import WeightedSFTDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "examples", "scripts", "train_wmle_llama.sh")
TINY = ["--data.max_len", "128", "--train.batch_size", "8", "--train.micro_batch_size", "4", "--adam.lr", "1e-3"]
METRICS = ("wmle_loss", "nll", "weight_max", "weight_entropy")


def positive_scores(tokenizer, negative_ids=None):
    """score_fn for write_score_dir: 1 on the key-word tokens, 0.05-0.09 elsewhere (a token RM's range, > 0); the
    response whose ids are ``negative_ids`` gets -0.5 on its first token."""
    from openrlhf_sepo.tiny import key_token_mask

    def scores(ids, prompt_len, side):
        pieces = tokenizer.convert_ids_to_tokens(ids[prompt_len:])
        values = [1.0 if key else 0.05 + 0.01 * (j % 5) for j, key in enumerate(key_token_mask(pieces))]
        if ids == negative_ids:
            values[0] = -0.5
        return values

    return scores


@pytest.fixture(scope="module")
def scores_dir(tiny_pairs, write_score_dir, tmp_path_factory):
    tokenizer, pairs = tiny_pairs
    return write_score_dir(str(tmp_path_factory.mktemp("wmle") / "scores"), tokenizer, pairs,
                           positive_scores(tokenizer))


@pytest.fixture(scope="module")
def negative_dir(tiny_pairs, write_score_dir, tmp_path_factory):
    """The tiny pairs with one negative token reward, in row 3's chosen response."""
    tokenizer, pairs = tiny_pairs
    return write_score_dir(str(tmp_path_factory.mktemp("wmle_neg") / "scores"), tokenizer, pairs,
                           positive_scores(tokenizer, negative_ids=pairs[3][1]))


def row_scores(dataset_dir, side):
    """[(prompt_len, ids, scores)] of one side of a scores dir, as written."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(dataset_dir, "data")).to_pylist()
    return [(r["prompt_len"], r[f"{side}_input_ids"], r[f"{side}_scores"]) for r in table]


# (a) token_weights

def test_token_weights_hand_computed():
    close = lambda got, want: torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))  # noqa: E731
    close(token_weights(torch.tensor([1.0, 2.0, 1.0]), "reward"), [0.25, 0.5, 0.25])
    # reward-to-go: [4, 3, 1] / 8
    close(token_weights(torch.tensor([1.0, 2.0, 1.0]), "reward", reward_to_go=True), [0.5, 0.375, 0.125])
    close(token_weights(torch.tensor([0.0, math.log(3.0)]), "exp"), [0.25, 0.75])
    # exp subtracts the row max: huge or very negative rewards give the same weights, never inf / NaN
    for base in (1000.0, -2000.0):
        close(token_weights(torch.tensor([base, base + math.log(3.0)], dtype=torch.float64), "exp"), [0.25, 0.75])
    # exp of the reward-to-go [log 3 + 0, log 3]: equal weights
    close(token_weights(torch.tensor([0.0, math.log(3.0)]), "exp", reward_to_go=True), [0.5, 0.5])
    close(token_weights(torch.tensor([-1.0, 2.0, -1.0]), "exp"),
          [math.exp(-3) / (1 + 2 * math.exp(-3)), 1 / (1 + 2 * math.exp(-3)), math.exp(-3) / (1 + 2 * math.exp(-3))])
    # several responses at once (concatenated, with their lengths): each normalised on its own, reward-to-go
    # never crosses a response boundary
    close(token_weights(torch.tensor([1.0, 3.0, 5.0, 2.0, 1.0, 1.0]), "reward", True, lengths=[2, 1, 3]),
          [4 / 7, 3 / 7, 1.0, 4 / 7, 2 / 7, 1 / 7])  # [4, 3] / 7, [5] / 5, [4, 2, 1] / 7
    # a single token takes all the weight, whatever its reward
    close(token_weights(torch.tensor([-7.5]), "exp"), [1.0])


@pytest.mark.parametrize("rewards,lengths,message", [
    ([1.0, 2.0, 0.5, -0.1, 3.0], [2, 2, 1], "1 response(s) has a negative token reward"),
    ([1.0, 2.0, 0.0, 0.0, 3.0], [2, 2, 1], "1 response(s) has token rewards summing to 0"),
])
def test_token_weights_refuses_what_reward_cannot_weight(rewards, lengths, message):
    with pytest.raises(ScoreDataError) as info:
        token_weights(torch.tensor(rewards), "reward", lengths=lengths)
    assert message in str(info.value) and "row 1" in str(info.value) and "--wmle.weight exp" in str(info.value)
    # exp takes any sign and never divides by 0
    weights = token_weights(torch.tensor(rewards), "exp", lengths=lengths)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    with pytest.raises(ScoreDataError, match="NaN or infinite reward: row 0"):
        token_weights(torch.tensor([float("nan"), 1.0]), "exp")


# (b) the dataset

@pytest.mark.parametrize("side,weight,reward_to_go", [("chosen", "reward", False), ("rejected", "exp", True)])
def test_dataset_weights_sit_at_the_response_in_loss_mask_layout(tiny_pairs, scores_dir, side, weight, reward_to_go):
    tokenizer, _ = tiny_pairs
    dataset = WeightedSFTDataset(scores_dir, tokenizer, 128, side=side, weight=weight, reward_to_go=reward_to_go)
    rows = row_scores(scores_dir, side)
    assert len(dataset) == len(rows) == 48
    for i, (prompt_len, ids, scores) in enumerate(rows):
        item_ids, attention, weights = dataset[i]
        assert item_ids[0].tolist() == ids and attention.all() and weights.dtype == torch.float32
        assert weights.shape == item_ids.shape  # SFTDataset's loss mask: [1, T], entry t trains token t+1
        expected = token_weights(torch.tensor(scores), weight, reward_to_go).float()
        # score j (token prompt_len + j) -> entry prompt_len + j - 1; prompt entries and the last entry are 0
        torch.testing.assert_close(weights[0, prompt_len - 1 : -1], expected)
        assert not weights[0, : prompt_len - 1].any() and weights[0, -1] == 0
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)

    ids, attention, weights = dataset.collate_fn([dataset[i] for i in range(4)])
    lengths = [len(rows[i][1]) for i in range(4)]
    assert ids.shape == attention.shape == weights.shape == (4, max(lengths))
    for i, n in enumerate(lengths):  # right padding: pad id, attention 0, weight 0
        assert (ids[i, n:] == tokenizer.pad_token_id).all() and not attention[i, n:].any() and not weights[i, n:].any()
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))


def test_dataset_names_the_row_and_the_flag(tiny_pairs, negative_dir):
    tokenizer, _ = tiny_pairs
    with pytest.raises(ScoreDataError) as info:
        WeightedSFTDataset(negative_dir, tokenizer, 128, weight="reward")
    assert "chosen side" in str(info.value) and "row 3" in str(info.value) and "--wmle.weight exp" in str(info.value)
    WeightedSFTDataset(negative_dir, tokenizer, 128, weight="exp")  # any sign with exp
    WeightedSFTDataset(negative_dir, tokenizer, 128, side="rejected")  # the rejected side has no negative reward
    with pytest.raises(ScoreDataError, match="longer than --data.max_len 20"):
        WeightedSFTDataset(negative_dir, tokenizer, 20, weight="exp")


def test_scores_of_another_tokenizer_are_refused(tiny_pairs, write_score_dir, tmp_path):
    """Token rewards from a scorer (e.g. a token RM) whose tokenizer is not the policy's: the ids would not be the
    trained ids, so the dataset refuses them, naming both fingerprints."""
    tokenizer, pairs = tiny_pairs
    other = write_score_dir(str(tmp_path / "scores"), tokenizer, pairs, positive_scores(tokenizer),
                            fingerprint="0123456789abcdef")
    with pytest.raises(ScoreDataError, match="fingerprint 0123456789abcdef"):
        WeightedSFTDataset(other, tokenizer, 128)


# (c) the loss identity

def test_openrlhf_sft_loss_on_the_weights_is_the_weighted_mle(tiny_dir, tiny_pairs, scores_dir):
    """One optimizer step of 2 micro-batches x 2 sequences, as SFTTrainer.fit runs it: iter_grad_accum_global_norm's
    normaliser (fit's mask_fn), SFTLoss, and DeepSpeed's 1/gas scaling of each backward. Its loss and gradient equal
    mean_seq sum_t w_t * NLL_t computed by hand, one sequence at a time, and the trainer's logged wmle_loss is it."""
    from openrlhf.models import Actor, SFTLoss
    from openrlhf.utils.loss_utils import iter_grad_accum_global_norm

    from openrlhf_sepo.wmle_trainer import WeightedMLETrainer

    tokenizer, _ = tiny_pairs
    dataset = WeightedSFTDataset(scores_dir, tokenizer, 128, weight="exp", reward_to_go=True)
    actor = Actor(os.path.join(tiny_dir, "base"), attn_implementation="sdpa", param_dtype="bf16").float()
    rows = row_scores(scores_dir, "chosen")[:4]

    def grads():
        out = torch.cat([p.grad.flatten() for p in actor.parameters() if p.grad is not None])
        actor.zero_grad()
        return out

    # By hand: per sequence, unpadded, with the weights token_weights gives its scores.
    by_hand = 0.0
    for prompt_len, ids, scores in rows:
        logps = actor.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        w = token_weights(torch.tensor(scores), "exp", reward_to_go=True)
        by_hand = by_hand + sum(w[j] * -logps[prompt_len + j - 1, ids[prompt_len + j]] for j in range(len(scores)))
    by_hand = by_hand / len(rows)
    by_hand.backward()
    hand_grads = grads()

    # OpenRLHF's way, through the trainer's loss (SFTLoss plus the recorded sums).
    trainer = object.__new__(WeightedMLETrainer)
    trainer.sft_loss, trainer._sums = SFTLoss(), torch.zeros(6, dtype=torch.float64)
    trainer.strategy = SimpleNamespace(all_reduce=lambda data, op: data)
    window = [dataset.collate_fn([dataset[0], dataset[1]]), dataset.collate_fn([dataset[2], dataset[3]])]
    gas, step_loss = 2, 0.0
    mask_fn = lambda batch: batch[2].squeeze(1)[:, :-1]  # noqa: E731  (SFTTrainer.fit's sft_loss_mask)
    for (ids, attention, weights), info in iter_grad_accum_global_norm(window, SimpleNamespace(), gas, mask_fn):
        assert info["batch_num_tokens"].item() == pytest.approx(4 / gas)  # the step's sequences, / gas
        logps = actor(ids, attention_mask=attention, return_logprobs=True)
        loss = trainer._loss(logps, weights[:, :-1], **info) / gas  # DeepSpeed scales each backward by 1/gas
        loss.backward()
        step_loss += loss.item()
    assert step_loss == pytest.approx(by_hand.item(), rel=1e-5)
    torch.testing.assert_close(grads(), hand_grads, rtol=1e-4, atol=1e-6)
    metrics = trainer._pop_metrics()
    assert metrics["wmle_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert not trainer._sums.any()  # reset for the next step


# (d) end to end

def weighted_nll(model_dir, dataset):
    """mean_seq sum_t w_t * NLL_t over the data set, with a plain transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, attention, weights = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logps = model(ids, attention_mask=attention).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (-(logps * weights[:, :-1]).sum(-1)).mean().item()


@pytest.fixture(scope="module")
def trained(tiny_dir, scores_dir, tmp_path_factory):
    """SEPO_DEVICE=cpu train_wmle_llama.sh (its ZeRO-2, bf16, gradient checkpointing defaults) on 2 ranks:
    48 chosen responses, batch 8 -> 6 steps, an OpenRLHF checkpoint (and an HF one) every 2 steps."""
    work = tmp_path_factory.mktemp("wmle_train")
    paths = SimpleNamespace(out=str(work / "out"), ckpt=str(work / "ckpt"), tb=str(work / "tb"))
    env = {**os.environ, "SEPO_DEVICE": "cpu", "SEPO_NPROC": "2", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = ["bash", LAUNCHER, "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
           scores_dir, *TINY, "--ckpt.output_dir", paths.out, "--ckpt.path", paths.ckpt, "--ckpt.save_steps", "2",
           "--ckpt.save_hf", "--logger.tensorboard_dir", paths.tb]
    proc = subprocess.run(cmd, cwd=str(work), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:]
    paths.log = proc.stdout
    return paths


@pytest.mark.slow
def test_two_rank_launcher_run_lowers_the_weighted_nll(tiny_dir, tiny_pairs, scores_dir, trained, tb_scalars):
    assert "openrlhf_sepo.cpu openrlhf_sepo.cli.train_wmle" in trained.log and "--nproc_per_node 2" in trained.log
    tokenizer, _ = tiny_pairs
    dataset = WeightedSFTDataset(scores_dir, tokenizer, 128)
    before = weighted_nll(os.path.join(tiny_dir, "base"), dataset)
    after = weighted_nll(trained.out, dataset)  # the final HF checkpoint, loaded by transformers
    assert after < before - 0.2, (before, after)
    # --ckpt.save_hf writes global_stepN_hf beside the DeepSpeed checkpoints, and OpenRLHF's --ckpt.max_num rotation
    # (3) counts both kinds: steps 4 and 6 are left, each with its HF copy.
    assert weighted_nll(os.path.join(trained.ckpt, "global_step4_hf"), dataset) < before

    logs = tb_scalars(trained.tb)
    for metric in ("gpt_loss", "lr", "grad_norm", "loss_mean", *METRICS):
        values = logs[f"train/{metric}"]
        assert [step for step, _ in values] == [1, 2, 3, 4, 5, 6], metric
        assert all(math.isfinite(v) for _, v in values), metric
    # One micro-batch per rank and step (gas 1): OpenRLHF's gpt_loss, normalised by the step's weight sum over
    # both ranks, is the mean over the step's 8 sequences of sum_t w_t NLL_t, which wmle_loss computes directly.
    for (_, gpt), (_, wmle) in zip(logs["train/gpt_loss"], logs["train/wmle_loss"]):
        assert gpt == pytest.approx(wmle, rel=1e-4)
    wmle = [v for _, v in logs["train/wmle_loss"]]
    assert wmle[-1] < wmle[0]
    assert all(0 < v <= 1 for _, v in logs["train/weight_max"]) and all(v > 0 for _, v in logs["train/weight_entropy"])


@pytest.mark.slow
def test_resume_continues_at_the_right_step_with_eval(tiny_dir, tiny_pairs, scores_dir, trained, run, tb_scalars,
                                                      tmp_path):
    # Make the step-4 checkpoint the latest, as if the run had stopped there (mid-epoch: 32 of 48 samples).
    assert os.path.isdir(os.path.join(trained.ckpt, "global_step4"))
    with open(os.path.join(trained.ckpt, "latest"), "w") as f:
        f.write("global_step4")
    tb = str(tmp_path / "tb")
    proc = run("openrlhf_sepo.cli.train_wmle", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", scores_dir, *TINY,
        "--train.max_epochs", "1", "--ds.attn_implementation", "sdpa", "--model.gradient_checkpointing_enable",
        "--ckpt.path", trained.ckpt, "--ckpt.load_enable", "--ckpt.output_dir", str(tmp_path / "out"),
        "--logger.tensorboard_dir", tb, "--eval.dataset", scores_dir, "--eval.steps", "1",
    ], nproc=2)
    assert "consumed_samples: 32" in proc.stdout
    logs = tb_scalars(tb)
    assert [step for step, _ in logs["train/gpt_loss"]] == [5, 6]
    # same weights, optimizer state and data position as the first run had at step 4: the same steps 5 and 6
    first = dict(tb_scalars(trained.tb)["train/wmle_loss"])
    assert [v for _, v in logs["train/wmle_loss"]] == pytest.approx([first[5], first[6]], rel=1e-3)
    assert [step for step, _ in logs["eval/eval gpt_loss"]] == [5, 6]
    for metric in METRICS:
        assert [step for step, _ in logs[f"eval/{metric}"]] == [5, 6], metric
    # OpenRLHF's evaluate on the weights is the weighted NLL (24 responses per rank, 6 full batches of 4)
    for (_, gpt), (_, wmle) in zip(logs["eval/eval gpt_loss"], logs["eval/wmle_loss"]):
        assert gpt == pytest.approx(wmle, rel=1e-4)
    # the eval set is the whole data set once: its weight statistics are the data set's
    tokenizer, _ = tiny_pairs
    dataset = WeightedSFTDataset(scores_dir, tokenizer, 128)
    max_weight = sum(dataset[i][2].max().item() for i in range(len(dataset))) / len(dataset)
    assert all(v == pytest.approx(max_weight, rel=1e-5) for _, v in logs["eval/weight_max"])


# (e) bad input

def test_negative_reward_stops_before_the_model_loads(tiny_dir, negative_dir, capsys, no_model_loads):
    from openrlhf_sepo.cli import train_wmle

    assert train_wmle.main(["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
                            negative_dir, *TINY]) == 1
    err = capsys.readouterr().err
    assert "train_wmle: error:" in err and "chosen side" in err
    assert "has a negative token reward" in err and "row 3" in err
    assert "use --wmle.weight exp" in err


@pytest.mark.parametrize("flags,message", [
    (["--data.dataset", "/nonexistent/scores"], "--data.dataset: scores dir '/nonexistent/scores' does not exist"),
    (["--eval.dataset", "/nonexistent/eval"], "--eval.dataset: scores dir '/nonexistent/eval' does not exist"),
    (["--wmle.side", "both"], "argument --wmle.side: invalid choice: 'both'"),
    (["--wmle.weight", "softmax"], "argument --wmle.weight: invalid choice: 'softmax'"),
    (["--data.input_key", "messages"], "unrecognized arguments: --data.input_key"),
])
def test_bad_flags_are_refused_before_training(tiny_dir, scores_dir, capsys, flags, message):
    from openrlhf_sepo.cli import train_wmle

    argv = ["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset", scores_dir, *flags]
    with pytest.raises(SystemExit) as exit_info:
        train_wmle.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_keeps_train_sft_names_and_defaults(tiny_dir, tiny_pairs, scores_dir):
    """Shared flags have train_sft's names and defaults; no tokenization flags; --wmle.* reach the dataset."""
    from openrlhf_sepo.cli import train_wmle

    defaults = {a.dest: a.default for a in train_wmle.build_parser()._actions}
    assert not [d for d in defaults if d in ("data.input_key", "data.apply_chat_template", "data.dataset_split",
                                             "data.multiturn", "model.pretrain_mode_enable", "use_ms")]
    for dest, value in {"train.micro_batch_size": 8, "train.batch_size": 128, "adam.lr": 5e-6, "ds.zero_stage": 2,
                        "data.max_len": 2048, "train.max_epochs": 2, "local_rank": -1, "ckpt.save_steps": -1,
                        "data.max_samples": 1000000, "wmle.side": "chosen", "wmle.weight": "reward",
                        "wmle.reward_to_go": False}.items():
        assert defaults[dest] == value, dest

    tokenizer, _ = tiny_pairs
    args = train_wmle.parse_args(["--model.model_name_or_path", os.path.join(tiny_dir, "base"), "--data.dataset",
                                  scores_dir, "--wmle.side", "rejected", "--wmle.weight", "exp", "--wmle.reward_to_go"])
    ds = train_wmle.weighted_dataset(args, tokenizer, None)
    assert (ds.side, ds.weight, ds.reward_to_go, ds.max_length) == ("rejected", "exp", True, 2048)

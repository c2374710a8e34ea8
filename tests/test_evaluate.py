"""Evaluation (``openrlhf_sepo.evaluation``): pairwise accuracy against a hand computation, generations scored
by the ground truth (passed in as ``reward_fn``), by a stand-in scorer and by a real OpenRLHF reward model, win-rate
arithmetic, format validity, the sampled KL to the baseline against a hand computation, the CLI directly and
through the CPU runtime and its old import path, bad input, and that the library imports no task.

Models whose behaviour is known by construction ("residual-only" Llamas): every layer writes zeros to the
residual stream, so the last hidden state is the one-hot embedding of the current token and the logits are
one column of a hand-written lm_head. That makes greedy and sampled outputs, and preferences, exact.
"""

import ast
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from openrlhf_sepo import evaluation as ev
from openrlhf_sepo import tiny
from openrlhf_sepo.cli import evaluate as cli_ev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _residual_only_llama(path, tokenizer_dir, lm_head_fn):
    """A real LlamaForCausalLM whose logits for current token i are lm_head[:, i] * sqrt(hidden)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    hidden = (vocab + 7) // 8 * 8  # >= vocab for one-hot embeddings; head_dim must be even for RoPE
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, hidden)
        head[:, :vocab] = lm_head_fn(tokenizer, vocab)
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _chain_model(path, tokenizer_dir, text):
    """Always answers ``text`` then EOS: every token outside the chain points to its first token."""

    def head(tokenizer, vocab):
        chain = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        assert len(set(chain)) == len(chain), f"chain tokens must be distinct: {chain}"
        w = torch.zeros(vocab, vocab)  # w[next, current]
        w[chain[0], :] = 1.0
        for cur, nxt in zip(chain, chain[1:]):
            w[:, cur] = 0.0
            w[nxt, cur] = 1.0
        return w

    return _residual_only_llama(path, tokenizer_dir, head)


def _favouring_model(path, tokenizer_dir, words):
    """In every context, the tokens of ``words`` get logit sqrt(hidden) (~18) and all others 0."""

    def head(tokenizer, vocab):
        w = torch.zeros(vocab, vocab)
        for word in words:
            for t in tokenizer.encode(" " + word, add_special_tokens=False):
                w[t, :] = 1.0
        return w

    return _residual_only_llama(path, tokenizer_dir, head)


@pytest.fixture(scope="module")
def chain_models(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chains")
    tok = os.path.join(tiny_dir, "tokenizer")
    return {
        "bad": _chain_model(out / "bad", tok, "vague careless sloppy misleading"),  # ground truth -1
        "good": _chain_model(out / "good", tok, "accurate helpful clear kind"),  # +1
        "mixed": _chain_model(out / "mixed", tok, "accurate wrong honest careful"),  # (3 - 1) / 4
        "bad2": _chain_model(out / "bad2", tok, "rude lazy harmful wrong"),  # -1: ties with "bad"
    }


def _rows(tiny_dir, name="pairs.jsonl", n=None):
    with open(os.path.join(tiny_dir, name)) as f:
        rows = [json.loads(line) for line in f]
    return rows[:n] if n else rows


CHAT = ev.DataFlags(apply_chat_template=True, max_len=128)
# The embedded task's scorers, as the CLI passes them for --reward ground_truth.
TRUTH = dict(reward_fn=cli_ev.ground_truth_rewards, format_fn=cli_ev.well_formed, reward_name="ground_truth")


def _hand_mean_logp(model, tokenizer, prompt_text, full_text):
    """Mean log p of the tokens after the prompt, on one unpadded sequence (no OpenRLHF code)."""
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full_text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    token_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logp[n_prompt - 1 :].mean().item()


def test_pairwise_accuracy_matches_hand_computation(tiny_dir):
    model, tokenizer = ev.load_policy(os.path.join(tiny_dir, "base"))
    rows = _rows(tiny_dir, n=7)
    # batch_size 3 -> ragged batches with right padding and a final batch of 1.
    got = ev.pairwise_accuracy(model, tokenizer, rows, CHAT, batch_size=3)

    margins = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
        # The template closes each turn with "</s>\n": the trailing newline is dropped, EOS kept.
        chosen = tokenizer.apply_chat_template(row["chosen"], tokenize=False).rstrip("\n")
        rejected = tokenizer.apply_chat_template(row["rejected"], tokenize=False).rstrip("\n")
        assert chosen.endswith(tokenizer.eos_token)
        margins.append(
            _hand_mean_logp(model, tokenizer, prompt, chosen) - _hand_mean_logp(model, tokenizer, prompt, rejected)
        )
    assert got["n_pairs"] == 7
    assert got["margins"] == pytest.approx(margins, abs=1e-5)
    assert got["pairwise_accuracy"] == sum(m > 0 for m in margins) / 7
    assert got["mean_margin"] == pytest.approx(sum(margins) / 7, abs=1e-5)


def test_pairwise_accuracy_follows_the_preferred_words(tiny_dir, tmp_path):
    tok = os.path.join(tiny_dir, "tokenizer")
    good = _favouring_model(tmp_path / "good", tok, tiny.GOOD_WORDS)
    bad = _favouring_model(tmp_path / "bad", tok, tiny.BAD_WORDS)
    rows = _rows(tiny_dir, "pairs_plain.jsonl", n=12)
    plain = ev.DataFlags(prompt_key="prompt", max_len=128)
    for path, expected in ((good, 1.0), (bad, 0.0)):
        model, tokenizer = ev.load_policy(path)
        got = ev.pairwise_accuracy(model, tokenizer, rows, plain, batch_size=5)
        assert got["pairwise_accuracy"] == expected
        assert (got["mean_margin"] > 1.0) == (expected == 1.0)


def test_generations_ground_truth_rewards_and_win_rates(tiny_dir, chain_models):
    # A stand-in template check that tells the chains apart, to see format_validity follow each model's own
    # responses (the real parser rejects every chain: none writes "The <topic> is ...").
    gen = ev.GenFlags(n_prompts=5, max_new_tokens=12, greedy=True, n_samples=5)
    report = ev.evaluate_models(
        chain_models, baseline="bad", data=ev.DataFlags(dataset=os.path.join(tiny_dir, "pairs.jsonl"),
                                                        apply_chat_template=True, max_len=128, max_samples=16),
        gen=gen, reward_fn=cli_ev.ground_truth_rewards, format_fn=lambda texts: ["helpful" in t for t in texts],
        reward_name="ground_truth", batch_size=2,
    )
    models = report["models"]
    assert report["n_prompts"] == 5 and report["n_pairs"] == 16 and report["reward_source"] == "ground_truth"
    expected_reward = {"bad": -1.0, "good": 1.0, "mixed": 0.5, "bad2": -1.0}
    expected_win = {"bad": 0.5, "good": 1.0, "mixed": 1.0, "bad2": 0.5}
    for name, m in models.items():
        assert [s["response"].split() for s in m["samples"]] == [m["samples"][0]["response"].split()] * 5
        assert m["reward_mean"] == pytest.approx(expected_reward[name])
        assert m["win_rate_vs_bad"] == expected_win[name]
        assert set(m) >= {"pairwise_accuracy", "mean_margin", "n_pairs", "n_prompts", "reward_source"}
        assert m["format_validity"] == (1.0 if name == "good" else 0.0)
        assert [s["well_formed"] for s in m["samples"]] == [name == "good"] * 5
        assert math.isfinite(m["kl_to_bad"])
    assert models["good"]["samples"][0]["response"].split() == ["accurate", "helpful", "clear", "kind"]
    # Greedy: the same 5 responses under both models. "bad" gives its own chain ~1 and the "good" chain
    # ~e^-18 per token, so the log-ratio of each model's own chain is large and positive; of "bad" exactly 0.
    assert models["bad"]["kl_to_bad"] == 0.0 and models["good"]["kl_to_bad"] > 10
    assert report["kl_unbiased"] is False
    table = ev.format_table(report)
    assert "format_validity" in table.splitlines()[0] and "kl_to_bad" in table.splitlines()[0]
    assert "not an unbiased KL estimate" in table.splitlines()[-1]
    # Win-rate arithmetic on rewards that are not all equal or all ordered.
    assert ev.win_rate([1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 1.0]) == (1 + 0.5 + 0 + 0) / 4


def test_sampled_generation_from_a_prompt_file(tiny_dir, chain_models, tmp_path):
    prompts = tmp_path / "held_out.jsonl"
    held_out = [r["prompt"] for r in tiny.make_pairs(4, seed=999)]
    prompts.write_text("".join(json.dumps({"question": p}) + "\n" for p in held_out))
    model, tokenizer = ev.load_policy(chain_models["mixed"])
    gen = ev.GenFlags(prompts=str(prompts), prompt_key="question", temperature=0.7, max_new_tokens=8)
    # Sampling still follows the chain: its next token has ~18 logits more than any other.
    assert [r.split() for r in ev.generate(model, tokenizer, held_out, CHAT, gen, batch_size=3)] == [
        ["accurate", "wrong", "honest", "careful"]
    ] * 4
    report = ev.evaluate_models({"mixed": chain_models["mixed"]}, data=CHAT, gen=gen, **TRUTH)
    assert report["n_prompts"] == 4 and report["n_pairs"] == 0
    assert report["models"]["mixed"]["samples"][0]["prompt"] == held_out[0]
    assert "pairwise_accuracy" not in report["models"]["mixed"]
    with pytest.raises(ValueError, match="reward_fn must give one value per response: 1 for mixed's 4"):
        ev.evaluate_models({"mixed": chain_models["mixed"]}, data=CHAT, gen=gen, reward_fn=lambda texts: [0.0])


def test_format_validity_is_the_share_of_well_formed_responses():
    rows = tiny.make_pairs(3, seed=5)
    responses = [
        rows[0]["chosen"],  # the template: well formed
        "  " + rows[1]["rejected"] + "\n",  # surrounding whitespace is ignored
        rows[2]["chosen"].replace("My note is", "My note:"),  # broken template
        "accurate helpful clear kind",  # key words alone
        "",
    ]
    assert [tiny.is_well_formed(r) for r in responses] == [True, True, False, False, False]
    assert cli_ev.well_formed(responses) == [True, True, False, False, False]
    assert cli_ev.format_validity(responses) == 2 / 5
    assert cli_ev.format_validity(responses[:2]) == 1.0 and cli_ev.format_validity(responses[2:]) == 0.0


def _hand_response_logp(model, prompt_ids, response_ids):
    """sum_t log p(response_t | prompt, response_<t) on one unpadded sequence in float64 (no evaluate code)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    token_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logp[len(prompt_ids) - 1 :].sum().item()


@pytest.fixture(scope="module")
def perturbed_model(tiny_dir, tmp_path_factory):
    """The tiny base model with noise added to its lm_head: a policy at a clear, finite KL from the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tmp_path_factory.mktemp("perturbed"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "base"))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "base")).save_pretrained(path)
    return path


def test_response_logprob_sums_match_hand_computation(tiny_dir, perturbed_model):
    base, tokenizer = ev.load_policy(os.path.join(tiny_dir, "base"))
    policy, _ = ev.load_policy(perturbed_model)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    # Prompts of 1, 3 and 13 tokens; responses of different lengths, two closed by EOS: with batch_size 2 the
    # rows are right-padded to different widths and the last batch holds one row.
    prompt_ids = [encode("Write"), encode("Write a note."),
                  encode("Write a short note about the old stone bridge near the quiet village.")]
    response_ids = [encode("The lake is calm.") + [eos], encode("accurate wrong"), encode("My note is kind and clear") + [eos]]
    assert len({len(p) for p in prompt_ids}) == 3 and len({len(r) for r in response_ids}) == 3
    for model in (base, policy):
        got = ev.response_logprob_sums(model, prompt_ids, response_ids, batch_size=2)
        expected = [_hand_response_logp(model, p, r) for p, r in zip(prompt_ids, response_ids)]
        assert got == pytest.approx(expected, abs=1e-4)
    # The per-sample log-ratio that kl_to_<baseline> averages.
    ratio = [a - b for a, b in zip(ev.response_logprob_sums(policy, prompt_ids, response_ids, 3),
                                   ev.response_logprob_sums(base, prompt_ids, response_ids, 1))]
    hand = [_hand_response_logp(policy, p, r) - _hand_response_logp(base, p, r)
            for p, r in zip(prompt_ids, response_ids)]
    assert ratio == pytest.approx(hand, abs=1e-4) and max(abs(h) for h in hand) > 0.5
    with pytest.raises(ValueError, match="at least one token"):
        ev.response_logprob_sums(base, [[]], [[eos]])


def test_generate_ids_drop_left_padding_and_stop_at_the_first_eos(tiny_dir, chain_models):
    model, tokenizer = ev.load_policy(chain_models["good"])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    chain, eos = encode("accurate helpful clear kind"), tokenizer.eos_token_id
    assert tokenizer.pad_token_id != eos
    # Plain prompts of different lengths in one batch; the second ends inside the chain, so it finishes two
    # tokens early and generate pads its row after EOS.
    prompts = ["Write a note.", "My note is accurate helpful", "Write a short note about the quiet village."]
    plain = ev.DataFlags()
    gen = ev.GenFlags(greedy=True, max_new_tokens=8)
    texts, prompt_ids, response_ids = ev.generate(model, tokenizer, prompts, plain, gen, batch_size=3, return_ids=True)
    assert texts == ev.generate(model, tokenizer, prompts, plain, gen, batch_size=3)
    assert prompt_ids == [encode(p) for p in prompts]
    assert response_ids == [chain + [eos], chain[2:] + [eos], chain + [eos]]
    # No EOS within max_new_tokens: every generated token is the response.
    short = ev.GenFlags(greedy=True, max_new_tokens=3)
    assert ev.generate(model, tokenizer, prompts, plain, short, batch_size=3, return_ids=True)[2] == [
        chain[:3], chain[2:] + [eos], chain[:3]
    ]


def test_kl_to_baseline_matches_a_hand_estimate(tiny_dir, perturbed_model, monkeypatch):
    base = os.path.join(tiny_dir, "base")
    loads = []
    load_policy = ev.load_policy
    monkeypatch.setattr(ev, "load_policy", lambda path, *a, **k: loads.append(path) or load_policy(path, *a, **k))
    data = ev.DataFlags(dataset=os.path.join(tiny_dir, "pairs.jsonl"), apply_chat_template=True, max_len=128,
                        max_samples=8)
    gen = ev.GenFlags(n_prompts=5, max_new_tokens=10, n_samples=5)  # sampling at temperature 1, top_p 1
    # The baseline in the middle: "perturbed" is scored while it is loaded, "copy" after one reload.
    models = {"perturbed": perturbed_model, "base": base, "copy": base}
    report = ev.evaluate_models(models, baseline="base", data=data, gen=gen, batch_size=2, **TRUTH)
    assert loads == [perturbed_model, base, base, base]
    assert report["kl_unbiased"] is True
    m = report["models"]
    # KL of the baseline to itself, and of an identical model sampled with the same seed, is exactly 0.
    assert m["base"]["kl_to_base"] == 0.0 and m["copy"]["kl_to_base"] == 0.0

    # By hand: the perturbed policy's samples (same seed and batches), scored by both models one at a time.
    policy, tokenizer = load_policy(perturbed_model)
    reference, _ = load_policy(base)
    prompts = ev.preference_prompts(ev.load_rows(data.dataset, max_samples=8), data)[:5]
    texts, prompt_ids, response_ids = ev.generate(policy, tokenizer, prompts, data, gen, batch_size=2, return_ids=True)
    assert texts == [s["response"] for s in m["perturbed"]["samples"]]
    hand = sum(_hand_response_logp(policy, p, r) - _hand_response_logp(reference, p, r)
               for p, r in zip(prompt_ids, response_ids)) / 5
    assert m["perturbed"]["kl_to_base"] == pytest.approx(hand, abs=1e-4) and hand > 0.1

    # Format validity: the share over every response, which here (n_samples = n_prompts) are all in the report;
    # an untrained model's samples never follow the template.
    for name, metrics in m.items():
        assert [s["well_formed"] for s in metrics["samples"]] == [
            tiny.is_well_formed(s["response"]) for s in metrics["samples"]
        ]
        assert metrics["format_validity"] == sum(s["well_formed"] for s in metrics["samples"]) / 5
    assert m["base"]["format_validity"] == 0.0


def test_kl_needs_the_baselines_vocabulary(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = str(tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "base"))
    tokenizer.add_tokens(["zzzq"])  # one more token: the ids no longer mean the same to both
    tokenizer.save_pretrained(other)
    AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "base")).save_pretrained(other)
    gen = ev.GenFlags(prompts=os.path.join(tiny_dir, "pairs_plain.jsonl"), n_prompts=2, max_new_tokens=4)
    report = ev.evaluate_models({"base": os.path.join(tiny_dir, "base"), "other": other}, data=ev.DataFlags(),
                                gen=gen, **TRUTH)
    assert report["models"]["base"]["kl_to_base"] == 0.0 and report["models"]["other"]["kl_to_base"] is None
    assert math.isfinite(report["models"]["other"]["format_validity"])
    assert ev.format_table(report).splitlines()[2].split()[-1] == "n/a"


@pytest.fixture(scope="module")
def reward_model(tiny_dir, run, tmp_path_factory):
    """A tiny OpenRLHF reward model trained for 6 steps by openrlhf.cli.train_rm through the CPU runtime."""
    out = str(tmp_path_factory.mktemp("rm"))
    pairs = os.path.join(tiny_dir, "pairs.jsonl")
    run("openrlhf.cli.train_rm", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"),
        "--data.dataset", pairs, "--eval.dataset", pairs,  # the default eval split (1% of 48 rows) is empty
        "--data.apply_chat_template", "--data.max_len", "128", "--data.dataloader_num_workers", "0",
        "--train.micro_batch_size", "4", "--train.batch_size", "8", "--train.max_epochs", "1",
        "--adam.lr", "1e-3", "--ds.zero_stage", "0", "--ds.attn_implementation", "sdpa",
        "--ckpt.output_dir", out, "--ckpt.path", os.path.join(out, "ckpt"),
    ])
    return out


@pytest.mark.slow
def test_reward_model_scores_through_the_cpu_runtime(tiny_dir, chain_models, reward_model, run, tmp_path):
    output = tmp_path / "report.json"
    proc = run("openrlhf_sepo.cli.evaluate", [
        "--models", f"bad={chain_models['bad']},good={chain_models['good']}",
        "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--data.apply_chat_template",
        "--data.max_len", "128", "--data.max_samples", "16",
        "--gen.n_prompts", "3", "--gen.max_new_tokens", "8", "--gen.greedy", "--gen.n_samples", "3",
        "--reward.model_name_or_path", reward_model, "--batch_size", "2", "--output", str(output),
    ])
    assert "win_rate_vs_bad" in proc.stdout  # the printed table
    report = json.loads(output.read_text())
    assert report["reward_source"] == f"reward_model:{reward_model}" and report["n_pairs"] == 16

    # Independent check of every sample: the RM at fp32, one unpadded conversation at a time.
    rm, rm_tokenizer = ev.load_reward_model(reward_model)
    assert next(rm.parameters()).dtype == torch.float32
    for name, m in report["models"].items():
        assert math.isfinite(m["reward_mean"]) and m["win_rate_vs_bad"] in (0.0, 1 / 3, 0.5, 2 / 3, 1.0)
        for s in m["samples"]:
            text = rm_tokenizer.apply_chat_template(
                s["prompt"] + [{"role": "assistant", "content": s["response"]}], tokenize=False
            ).rstrip("\n")
            ids = torch.tensor([rm_tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                expected = rm(ids, attention_mask=torch.ones_like(ids)).item()
            assert s["reward"] == pytest.approx(expected, abs=1e-5)
    good_r = [s["reward"] for s in report["models"]["good"]["samples"]]
    bad_r = [s["reward"] for s in report["models"]["bad"]["samples"]]
    wins = sum(1.0 if g > b else 0.5 if g == b else 0.0 for g, b in zip(good_r, bad_r)) / 3
    assert report["models"]["good"]["win_rate_vs_bad"] == pytest.approx(wins)


@pytest.mark.slow
def test_cli_runs_directly_with_plain_data(tiny_dir, chain_models, tmp_path):
    output = tmp_path / "out" / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf_sepo.cli.evaluate", "--models", f"good={chain_models['good']}",
         "--data.dataset", os.path.join(tiny_dir, "pairs_plain.jsonl"), "--data.prompt_key", "prompt",
         "--data.input_template", "User: {}\nAssistant: ", "--data.max_len", "128",
         "--gen.n_prompts", "2", "--gen.max_new_tokens", "6", "--reward", "ground_truth",
         "--local_rank", "-1", "--output", str(output)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    m = json.loads(output.read_text())["models"]["good"]
    assert m["reward_mean"] == 1.0 and m["win_rate_vs_good"] == 0.5 and m["n_pairs"] == 48
    assert m["format_validity"] == 0.0 and m["kl_to_good"] == 0.0
    assert m["samples"][0]["prompt"].startswith("Write a short note")


def _no_template_model(tiny_dir, path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(os.path.join(tiny_dir, "base")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def untrained_reward_model(tiny_dir, tmp_path_factory):
    """An OpenRLHF reward model checkpoint saved as train_rm saves one (``save_pretrained`` of
    ``get_llm_for_sequence_regression(path, "reward")``: config architectures ``["RewardModel"]``), built in-process
    and untrained: what the input checks read of it is its config."""
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("untrained_rm"))
    base = os.path.join(tiny_dir, "base")
    model = get_llm_for_sequence_regression(base, "reward", param_dtype="bf16", attn_implementation="sdpa",
                                            dtype=torch.float32, init_value_head=True)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def test_bad_input_is_reported_before_any_model_is_loaded(tiny_dir, untrained_reward_model, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ev, "load_policy", must_not_load)
    monkeypatch.setattr(ev, "load_reward_model", must_not_load)
    base = os.path.join(tiny_dir, "base")
    pairs = os.path.join(tiny_dir, "pairs.jsonl")
    data = ev.DataFlags(dataset=pairs, apply_chat_template=True, max_len=128)
    no_gen = ev.GenFlags(n_prompts=0)
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"prompt": [{"role": "user", "content": "Write."}]}) + "\n")
    cases = [
        (dict(models={"sft": base, "x": str(tmp_path / "missing")}, data=data, gen=no_gen), "--models x"),
        (dict(models={"sft": base}, data=data), "--reward ground_truth or --reward.model_name_or_path"),
        (dict(models={"sft": base}, data=data, reward_model_path=str(tmp_path / "nope")),
         "--reward.model_name_or_path"),
        (dict(models={"sft": base}, data=data, reward_model_path=base, **TRUTH), "not both"),
        (dict(models={"sft": _no_template_model(tiny_dir, tmp_path / "plain")}, data=data, gen=no_gen),
         "--data.apply_chat_template"),
        (dict(models={"sft": base, "rm": untrained_reward_model}, data=data, gen=no_gen), "--models rm: "),
        (dict(models={"sft": base}, baseline="dpo", data=data, gen=no_gen), "--baseline 'dpo'"),
        (dict(models={"sft": base}, data=ev.DataFlags(dataset=pairs, chosen_key="better"), gen=no_gen),
         "--data.chosen_key 'better'"),
        (dict(models={"sft": base}, data=ev.DataFlags(dataset=str(tmp_path / "none.jsonl")), gen=no_gen),
         "--data.dataset"),
        (dict(models={"sft": base}, data=ev.DataFlags(dataset=os.path.join(tiny_dir, "pairs_plain.jsonl")),
              **TRUTH), "--data.prompt_key"),
        (dict(models={"sft": base}, data=ev.DataFlags(), **TRUTH), "nothing to evaluate"),
        (dict(models={"sft": base}, gen=ev.GenFlags(prompts=str(messages)), **TRUTH),
         "prompt 0 is a message list: it needs --data.apply_chat_template"),
        (dict(models={"sft": base}, data=data, gen=ev.GenFlags(temperature=0.0), **TRUTH), "--gen.temperature"),
    ]
    for kwargs, flag in cases:
        with pytest.raises(ev.EvaluationInputError) as err:
            ev.evaluate_models(**kwargs)
        assert flag in str(err.value), (flag, str(err.value))

    with pytest.raises(ev.EvaluationInputError, match="--models: 'sft' is not NAME=PATH|given twice"):
        cli_ev.parse_models("sft=a,sft=b")
    assert cli_ev.parse_models("sft=/a/b, /c/dpo/") == {"sft": "/a/b", "dpo": "/c/dpo/"}
    # The CLI turns these into one line on stderr and exit status 2, naming the flag.
    assert cli_ev.main(["--models", f"sft={base}", "--data.dataset", pairs, "--gen.n_prompts", "0",
                        "--ds.param_dtype", "fp32", "--baseline", "nope"]) == 2
    with pytest.raises(ev.EvaluationInputError, match="--reward must be 'ground_truth'"):
        cli_ev.evaluate_models({"sft": base}, data=data, reward="rm")


# The names the library had when it lived in the CLI module, still importable from there.
OLD_PATH_NAMES = ("DTYPES", "DataFlags", "EvaluationInputError", "GenFlags", "default_device", "format_table",
                  "generate", "load_policy", "load_reward_model", "load_rows", "pairwise_accuracy",
                  "preference_prompts", "render_prompt", "response_logprob_sums", "reward_model_rewards", "win_rate")


def test_the_old_import_path_still_works(tiny_dir):
    from openrlhf_sepo.cli.evaluate import (  # noqa: F401  (the import itself is the test)
        GROUND_TRUTH, evaluate_models, format_validity, ground_truth_rewards, parse_models,
    )

    assert all(getattr(cli_ev, name) is getattr(ev, name) for name in OLD_PATH_NAMES)
    # evaluate_models from the old path keeps its reward="ground_truth": the embedded task's scorers.
    gen = ev.GenFlags(prompts=os.path.join(tiny_dir, "pairs_plain.jsonl"), n_prompts=2, max_new_tokens=4)
    report = evaluate_models({"base": os.path.join(tiny_dir, "base")}, gen=gen, reward=GROUND_TRUTH)
    m = report["models"]["base"]
    assert report["reward_source"] == "ground_truth" and m["kl_to_base"] == 0.0
    assert m["reward_mean"] == sum(ground_truth_rewards(s["response"] for s in m["samples"])) / 2
    assert m["format_validity"] == format_validity([s["response"] for s in m["samples"]])


def _package_imports(module: str) -> set:
    """The ``openrlhf_sepo`` modules that ``module``'s source imports (any depth in the file, lazy ones too)."""
    parts = module.split(".")
    path = os.path.join(REPO, *parts) + ".py"
    if not os.path.isfile(path):
        path = os.path.join(REPO, *parts, "__init__.py")
    if not os.path.isfile(path):
        return set()
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] == "openrlhf_sepo"}


def test_evaluation_imports_no_task():
    """The metrics know no task: nothing ``openrlhf_sepo.evaluation`` imports, directly or through other modules
    of the package, is ``openrlhf_sepo.tiny`` or the CLI (the scorers come in as ``reward_fn``/``format_fn``)."""
    seen, todo = set(), ["openrlhf_sepo.evaluation"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_package_imports(module))
    assert "openrlhf_sepo.scoring" in seen  # the walk follows imports
    assert "openrlhf_sepo.tiny" not in seen and not [m for m in seen if m.startswith("openrlhf_sepo.cli")]

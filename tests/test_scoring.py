"""Unit tests of openrlhf_sepo.scoring and of score_tokens' per-row tokenization (in-process, tiny models)."""

import os
from types import SimpleNamespace

import pytest
import torch

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import tiny
from openrlhf_sepo.rows import DataStrategy, RowTokenizer
from openrlhf_sepo.scoring import label_logprobs, num_selected, select_key_tokens, token_scores
from openrlhf_sepo.skips import Skip, SkipCounter


# ----------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("n,k,expected", [(10, 0.3, 3), (3, 0.1, 1), (1, 0.5, 1), (7, 1.0, 7), (0, 0.3, 0), (100, 0.07, 7)])
def test_num_selected_formula(n, k, expected):
    assert num_selected(n, k) == expected
    assert num_selected(torch.tensor([n]), k).item() == expected


def test_num_selected_rejects_bad_ratio():
    for k in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="selection ratio"):
            num_selected(5, k)


def test_selection_counts_and_extremes_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 40, (6,), generator=gen)
        scores = torch.randn(6, 40, generator=gen)
        for k in (0.1, 0.3, 0.5, 1.0):
            for largest in (True, False):
                mask = select_key_tokens(scores, k, largest, lengths)
                for i, n in enumerate(lengths.tolist()):
                    row, sel = scores[i, :n], mask[i, :n]
                    assert int(mask[i].sum()) == max(1, int(k * n + 1e-9))  # count, never empty
                    assert not mask[i, n:].any()  # padding never selected
                    if sel.all():
                        continue
                    if largest:  # every selected score >= every unselected one
                        assert row[sel].min() >= row[~sel].max()
                    else:
                        assert row[sel].max() <= row[~sel].min()


def test_selection_ties_broken_by_position_and_deterministic():
    scores = torch.tensor([[1.0, 5.0, 5.0, 5.0, 0.0, 5.0]])
    chosen = select_key_tokens(scores, 0.5, largest=True)  # n = 3 of four tied 5.0s: the first three
    assert chosen.tolist() == [[False, True, True, True, False, False]]
    rejected = select_key_tokens(torch.zeros(8), 0.25, largest=False)  # all tied: the first two
    assert rejected.tolist() == [True, True] + [False] * 6
    for _ in range(3):
        assert torch.equal(select_key_tokens(scores, 0.5, largest=True), chosen)


def test_selection_single_token_and_empty_rows():
    scores = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 3.0, 0.0]])
    mask = select_key_tokens(scores, 0.1, largest=False, lengths=torch.tensor([1, 0]))
    assert mask.tolist() == [[True, False, False], [False, False, False]]


def test_selection_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        select_key_tokens(torch.tensor([1.0, float("nan")]), 0.5, largest=True)


# ----------------------------------------------------------------------------------------------- log-probs and scores


def test_label_logprobs_equals_log_softmax_and_chunking_is_invisible():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=gen) * 4
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    for chunk in (1, 5, 4096):
        torch.testing.assert_close(label_logprobs(logits, labels, chunk_tokens=chunk), expected, atol=1e-6, rtol=0)
    got = label_logprobs(logits.bfloat16(), labels)  # computed in fp32 from bf16 logits
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("vocab", [8192, 40000])  # 40000: a lone row would be reduced across threads
def test_label_logprobs_chunks_change_no_bit(vocab):
    """score_tokens' scores must not depend on the chunking (response_logprobs' cache-sized chunks on the CPU
    against the one 2048-position chunk of earlier versions): every position's logsumexp is reduced alone."""
    from openrlhf_sepo.scoring import _normalizer_chunk

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 67, vocab, generator=gen) * 3  # 268 positions
    labels = torch.randint(0, vocab, (4, 67), generator=gen)
    whole = label_logprobs(logits, labels, chunk_tokens=2048)
    assert _normalizer_chunk(logits) == max(2, (2 << 20) // (4 * vocab))
    for chunk in (_normalizer_chunk(logits), 2, 3, 89, 133, 267):
        assert torch.equal(label_logprobs(logits, labels, chunk_tokens=chunk), whole), chunk
    # Positions whose logsumexp comes out otherwise when reduced alone (over a large vocabulary one row may be
    # split across threads, machine-dependent): as the last of n positions in chunks of n - 1, each joins the chunk
    # before, so even those keep their bits.
    flat, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1)
    alone = torch.cat([torch.logsumexp(flat[i : i + 1], -1) for i in range(1, len(flat))])
    differ = [i + 1 for i in (alone != torch.logsumexp(flat[1:], -1)).nonzero().flatten().tolist()]
    for i in differ[:4]:
        assert torch.equal(label_logprobs(flat[: i + 1], flat_labels[: i + 1], chunk_tokens=i), whole.reshape(-1)[: i + 1])


@pytest.fixture(scope="module")
def two_models(tiny_dir):
    """(oracle, ref, tokenizer): two different tiny Llamas sharing the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oracle_dir = os.path.join(tiny_dir, "oracle_unit")
    if not os.path.exists(oracle_dir):
        tiny.build_model(oracle_dir, os.path.join(tiny_dir, "tokenizer"), seed=1)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").eval()  # noqa: E731
    return load(oracle_dir), load(os.path.join(tiny_dir, "base")), AutoTokenizer.from_pretrained(oracle_dir)


def per_example_scores(oracle, ref, ids, prompt_len):
    """Independent reference: one unpadded sequence, full fp32 log-softmax, response tokens prompt_len..end."""
    x = torch.tensor([ids])
    with torch.no_grad():
        lo = torch.log_softmax(oracle(x).logits[0].float(), -1)
        lr = torch.log_softmax(ref(x).logits[0].float(), -1)
    return torch.stack([lo[p - 1, ids[p]] - lr[p - 1, ids[p]] for p in range(prompt_len, len(ids))])


def test_token_scores_in_padded_batches_equal_per_example(two_models):
    oracle, ref, tok = two_models
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(10, len(tok), (n,), generator=gen).tolist() for n in (9, 23, 4, 16)]
    seqs = [s + [tok.eos_token_id] for s in seqs]
    prompt_lens = [3, 11, 1, 7]  # different prompts: the batch start is the shortest prompt
    width = max(map(len, seqs))
    ids = torch.full((4, width), tok.pad_token_id)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    got = token_scores(oracle, ref, ids, mask, prompt_lens, [len(s) for s in seqs])
    for s, p, g in zip(seqs, prompt_lens, got):
        assert g.dtype == torch.float32 and len(g) == len(s) - p  # first response token and EOS included
        torch.testing.assert_close(g, per_example_scores(oracle, ref, s, p), atol=1e-5, rtol=0)
    assert any(g.abs().max() > 1e-3 for g in got)  # two different models: scores are not all zero


# ----------------------------------------------------------------------------------------------- per-row tokenization


def _strategy(**data):
    base = dict(prompt_key=None, chosen_key="chosen", rejected_key="rejected", apply_chat_template=False,
                tokenizer_chat_template=None, input_template=None, max_len=128)
    base.update(data)
    return DataStrategy(SimpleNamespace(**base))


def _reward_dataset_ids(rows, tokenizer, strategy):
    """OpenRLHF's own RewardDataset(is_dpo=True) over the rows: list of (chosen ids, rejected ids, prompt_len)."""
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset

    ds = RewardDataset(Dataset.from_list(rows), tokenizer, strategy.args.data.max_len, strategy,
                       input_template=strategy.args.data.input_template, is_dpo=True, num_processors=1)
    return [(c[0].tolist(), r[0].tolist(), p) for c, _, r, _, p in (ds[i] for i in range(len(ds)))]


@pytest.mark.parametrize("shape", ["ultrafeedback", "plain"])
def test_row_tokenizer_ids_equal_openrlhf_reward_dataset(tiny_dir, shape):
    import json

    from transformers import AutoTokenizer

    path = tiny.write_preference_data(os.path.join(tiny_dir, f"ids_{shape}.jsonl"), 12, seed=5, shape=shape)
    rows = [json.loads(line) for line in open(path)]
    # A prompt too long for max_len in the middle: RewardDataset drops it silently, RowTokenizer names it.
    long_prompt = "Write a short note about the river. " * 40
    if shape == "plain":
        rows[4]["prompt"] = long_prompt
        strategy = _strategy(prompt_key="prompt", input_template="Question: {}\nAnswer: ")
    else:
        for side in ("chosen", "rejected"):
            rows[4][side][0]["content"] = long_prompt
        strategy = _strategy(apply_chat_template=True)
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))
    expected = _reward_dataset_ids(rows, tok, strategy)
    assert len(expected) == len(rows) - 1

    row_tok = RowTokenizer(AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer")), strategy)
    results = [row_tok.encode(r) for r in rows]
    assert isinstance(results[4], Skip) and results[4].reason == "prompt_too_long"
    kept = [(c, r, p) for p, c, r in (res for i, res in enumerate(results) if i != 4)]
    assert kept == expected
    assert all(c[-1] == tok.eos_token_id and r[-1] == tok.eos_token_id for c, r, _ in kept)


def test_row_tokenizer_names_every_bad_row(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))
    plain = RowTokenizer(tok, _strategy(prompt_key="prompt", max_len=64))
    good = {"prompt": "Write a note.", "chosen": "The river is clear.", "rejected": "The river is wrong."}
    assert isinstance(plain.encode(good)[0], int)
    cases = {
        "missing_key": {"prompt": "Write a note.", "chosen": "A."},
        "non_text": {**good, "chosen": 3.5},
        "empty_response": {**good, "rejected": "  \n "},
        "prompt_too_long": {**good, "prompt": "the river " * 60},
        "identical_responses": {**good, "rejected": good["chosen"]},
    }
    for reason, row in cases.items():
        got = plain.encode(row)
        assert isinstance(got, Skip) and got.reason == reason, (reason, got)
        assert isinstance(got.message, str) and got.message
    # Within max_len, a prompt must leave more than 2 response tokens (RewardDataset's own rule); a long
    # response is then truncated to what is left, EOS forced at the end.
    n_prompt = len(tok(good["prompt"], add_special_tokens=False)["input_ids"])
    long_row = {**good, "chosen": "the river " * 20}
    assert RowTokenizer(tok, _strategy(prompt_key="prompt", max_len=n_prompt + 2)).encode(long_row)[0] == "prompt_too_long"
    prompt_len, chosen_ids, _ = RowTokenizer(tok, _strategy(prompt_key="prompt", max_len=n_prompt + 3)).encode(long_row)
    assert prompt_len == n_prompt and len(chosen_ids) == n_prompt + 3 and chosen_ids[-1] == tok.eos_token_id
    # No prompt at all: the first response token would have no context.
    no_prompt = RowTokenizer(tok, _strategy())
    assert no_prompt.encode(good)[0] == "empty_prompt"
    chat = RowTokenizer(tok, _strategy(apply_chat_template=True))
    user = {"role": "user", "content": "Write a note."}
    msg = lambda text: [user, {"role": "assistant", "content": text}]  # noqa: E731
    assert chat.encode({"chosen": msg("Clear."), "rejected": msg(None)})[0] == "non_text"
    assert chat.encode({"chosen": msg("Clear."), "rejected": "not a message list"})[0] == "non_text"
    assert chat.encode({"chosen": msg(""), "rejected": msg("Wrong.")})[0] == "empty_response"
    assert isinstance(chat.encode({"chosen": msg("Clear."), "rejected": msg("Wrong.")})[0], int)


def test_skip_counter_counts_keeps_the_first_examples_and_reports():
    skips = SkipCounter(("declared", "other"), kept=2)
    for index, reason in enumerate(["seen", "declared", "seen", "seen"]):
        skips.add(index, Skip(reason, f"message {index}"))
    assert skips.counts == {"declared": 1, "other": 0, "seen": 3} and skips.total == 4
    assert skips.examples == {"seen": [(0, "message 0"), (2, "message 2")], "declared": [(1, "message 1")]}
    assert skips.report() == ["  skipped 3 (seen), e.g. row 0: message 0", "  skipped 1 (declared), e.g. row 1: message 1"]
    assert skips.labelled_examples()["seen"] == ["row 0: message 0", "row 2: message 2"]
    # Shard records (by row index) merge back in shard order: counts summed, the first `kept` examples per reason.
    assert [r["index"] for r in skips.to_records()] == [0, 1, 2]  # the kept examples
    merged = SkipCounter(("declared", "other"), kept=2)
    merged.add_records({"seen": 1}, [{"index": 0, "reason": "seen", "message": "first shard"}])
    merged.add_records(skips.counts, skips.to_records())
    assert merged.counts == {"declared": 1, "other": 0, "seen": 4}
    assert merged.examples == {"seen": [(0, "first shard"), (0, "message 0")], "declared": [(1, "message 1")]}


def test_moved_names_keep_their_old_import_paths():
    """rows / scores_dir / score_tokens / wmle_data / wmle_trainer hold them now; the old paths re-export them."""
    from openrlhf_sepo import datasets, rows, score_tokens, scores_dir, wmle, wmle_data, wmle_trainer
    from openrlhf_sepo.cli import score_tokens as cli

    assert datasets.DataStrategy is rows.DataStrategy and cli.RowTokenizer is rows.RowTokenizer
    assert datasets.ScoreDataError is scores_dir.ScoreDataError and datasets.read_manifest is scores_dir.read_manifest
    assert (cli.load_model, cli.load_tokenizer, cli.make_batches, cli.KILL_AFTER_SHARDS_ENV) == (
        score_tokens.load_model, score_tokens.load_tokenizer, score_tokens.make_batches,
        score_tokens.KILL_AFTER_SHARDS_ENV)
    assert wmle.WeightedSFTDataset is wmle_data.WeightedSFTDataset
    assert wmle.WeightedMLETrainer is wmle_trainer.WeightedMLETrainer


def test_scored_logprobs_plain_head_equals_the_models_own_forward(two_models):
    """The packed path (body, then the LM head at the scored tokens only) against the model's own forward with
    logits_to_keep (the path of every other model), on rows whose prompts differ and with right padding."""
    import copy

    from openrlhf_sepo.scoring import _PLAIN_HEADS, response_logprobs, scored_logprobs

    oracle, _, tok = two_models
    gen = torch.Generator().manual_seed(4)
    lengths, prompt_lens = [12, 20, 7, 15], [5, 9, 2, 6]
    ids = torch.full((4, 20), tok.pad_token_id)
    mask = torch.zeros((4, 20), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = torch.randint(10, len(tok), (n,), generator=gen), 1
    start = min(prompt_lens)
    token = torch.arange(start, 20)
    scored = (token >= torch.tensor(prompt_lens)[:, None]) & (token < torch.tensor(lengths)[:, None])
    with torch.inference_mode():
        _PLAIN_HEADS.pop(oracle, None)
        expected = response_logprobs(oracle, ids, mask, start)[scored]
        first = scored_logprobs(oracle, ids, mask, start, scored)  # checked against its own forward
        assert _PLAIN_HEADS[oracle] is not None  # a Llama: logits = lm_head(last hidden state)
        later = scored_logprobs(oracle, ids, mask, start, scored)  # the body alone
    for got in (first, later):
        assert got.dtype == torch.float32 and got.shape == (sum(n - p for p, n in zip(prompt_lens, lengths)),)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # A model whose logits are not the plain head's (here: doubled) or whose config names a logit transform is
    # scored through its own forward.
    class Doubled(type(oracle)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    doubled = copy.deepcopy(oracle)
    doubled.__class__ = Doubled
    capped = copy.deepcopy(oracle)
    capped.config.final_logit_softcapping = 30.0
    with torch.inference_mode():
        for model in (doubled, capped):
            for _ in range(2):  # the first batch (checked) and a later one
                torch.testing.assert_close(scored_logprobs(model, ids, mask, start, scored),
                                           response_logprobs(model, ids, mask, start)[scored], atol=0, rtol=0)
                assert _PLAIN_HEADS[model] is None

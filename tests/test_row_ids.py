"""Batched row tokenization (``RowTokenizer.encode_many``, ``openrlhf_internals.dpo_texts`` / ``dpo_ids``) against
OpenRLHF's own ``RewardDataset(is_dpo=True)``, row by row, on rows of every shape the project accepts: message
lists (with and without a prompt column), plain strings (with and without an input template), HH dialogues
(``--data.prompt_split marker`` and ``common_prefix``, strings and message lists), multi-turn, unicode, rows
truncated at max_len, and rows skipped (each reason, as ``encode`` one row at a time names it). Then the scoring
engine's pipeline: a shard prepared ahead on another thread scores exactly what one prepared inline does."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import tiny
from openrlhf_sepo.hh import split_prompt
from openrlhf_sepo.rows import CrossRowTokenizer, DataStrategy, RowTokenizer
from openrlhf_sepo.skips import Skip

H, A = "\n\nHuman: ", "\n\nAssistant:"
UNICODE = "ünïcødé — 河流 ✓ 🙂"


def _data(**flags):
    base = dict(prompt_key=None, chosen_key="chosen", rejected_key="rejected", apply_chat_template=False,
                tokenizer_chat_template=None, input_template=None, max_len=64, prompt_split="none")
    return SimpleNamespace(**{**base, **flags})


def _tokenizer(tiny_dir, name="tokenizer"):
    from openrlhf.utils import get_tokenizer

    return get_tokenizer(os.path.join(tiny_dir, name), None, "right", None)


def _msgs(*turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _reward_dataset_row(row, tokenizer, data):
    """OpenRLHF's RewardDataset(is_dpo=True) on one row: (prompt_len, chosen_ids, rejected_ids), or None (dropped)."""
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset

    ds = RewardDataset(Dataset.from_list([row]), tokenizer, data.max_len, DataStrategy(data, quiet=True),
                       input_template=data.input_template, is_dpo=True, num_processors=1)
    if len(ds) == 0:
        return None
    chosen, _, rejected, _, prompt_len = ds[0]
    return prompt_len, chosen[0].tolist(), rejected[0].tolist()


def _chat_rows():
    long = "the river is calm and clear " * 12
    return [
        {"chosen": _msgs("Write a note.", "The river is clear."), "rejected": _msgs("Write a note.", "The river is wrong.")},
        {"chosen": _msgs("Write a note.", "Clear.", f"Again? {UNICODE}", f"The lake is calm {UNICODE}."),  # multi-turn
         "rejected": _msgs("Write a note.", "Clear.", f"Again? {UNICODE}", "The lake is cold.")},
        {"chosen": _msgs("Write a note.", long), "rejected": _msgs("Write a note.", "The lake " * 30)},  # truncated
        {"chosen": _msgs("the river " * 40, "Clear."), "rejected": _msgs("the river " * 40, "Wrong.")},  # prompt too long
        {"chosen": _msgs("Write a note.", "Same."), "rejected": _msgs("Write a note.", "Same.")},  # identical
        {"chosen": _msgs("Write a note.", "Ends with a newline.\n\n"), "rejected": _msgs("Write a note.", "No.")},
    ]


def _plain_rows():
    return [
        {"prompt": "Write a note.", "chosen": "The river is clear.", "rejected": "The river is wrong."},
        {"prompt": f"Write a note {UNICODE}.", "chosen": f"{UNICODE} clear.", "rejected": f"{UNICODE} wrong.\n"},
        {"prompt": "Write a note.", "chosen": "word " * 80, "rejected": "the lake is calm"},  # truncated
        {"prompt": "Write a note. " * 40, "chosen": "Clear.", "rejected": "Wrong."},  # prompt too long
        {"prompt": "Write a note.", "chosen": "Same.", "rejected": "Same."},  # identical
        {"prompt": "Write a note.", "chosen": "It ends with the EOS </s>", "rejected": "Wrong."},
        {"prompt": "", "chosen": "No prompt at all.", "rejected": "None."},  # empty prompt
    ]


def _hh_rows():
    rows = []
    for i, (q, good, bad) in enumerate([("Write a note.", "The river is clear.", "The river is wrong."),
                                        (f"Write {UNICODE}?", f"Yes {UNICODE}.", "No."),
                                        ("Long?", "word " * 60, "no")]):
        before = f"{H}Earlier question?{A} Earlier answer." if i == 1 else ""  # multi-turn
        prompt = before + H + q + A
        rows.append({"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"})
    rows.append({"chosen": f"{H}A?{A} yes", "rejected": f"{H}B?{A} no"})  # no shared prompt (marker split)
    rows.append({"chosen": f"{H}A?{A} yes", "rejected": f"{H}A?{A} yes"})  # identical
    return rows


CASES = {
    "messages": (_chat_rows, dict(apply_chat_template=True)),
    "messages_prompt_key": (lambda: [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
                                     for r in _chat_rows()], dict(apply_chat_template=True, prompt_key="prompt")),
    "plain": (_plain_rows, dict(prompt_key="prompt")),
    "plain_template": (_plain_rows, dict(prompt_key="prompt", input_template="Question: {}\nAnswer: ")),
    "plain_no_prompt": (_plain_rows, dict()),
    "hh_marker": (_hh_rows, dict(prompt_split="marker", assistant_marker=A, max_len=48)),
    "hh_common_prefix": (_hh_rows, dict(prompt_split="common_prefix", assistant_marker=A, max_len=48)),
    "hh_messages": (lambda: [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in _chat_rows()],
                    dict(apply_chat_template=True, prompt_split="common_prefix", assistant_marker=A)),
}


def _expected(row, tokenizer, data):
    """What RewardDataset makes of the row, with RowTokenizer's own prompt split applied first (as train_dpo sees
    the pre-split rows with a prompt column); None when RewardDataset drops the row."""
    if data.prompt_split != "none":
        parts = split_prompt(row["chosen"], row["rejected"], data.prompt_split, data.assistant_marker)
        if parts is None:
            return "no_shared_prompt"
        row, data = dict(zip(("prompt", "chosen", "rejected"), parts)), SimpleNamespace(**{**vars(data), "prompt_key": "prompt"})
    return _reward_dataset_row(row, tokenizer, data)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_ids_equal_openrlhf_reward_dataset_row_by_row(tiny_dir, case):
    make_rows, flags = CASES[case]
    rows, data = make_rows(), _data(**flags)
    row_tok = RowTokenizer(_tokenizer(tiny_dir), DataStrategy(data, quiet=True))
    batched = row_tok.tokenize_many(rows)
    assert len(batched) == len(rows) and len(row_tok.texts) == len(rows)
    compared = 0
    for row, got in zip(rows, batched):
        assert got == row_tok.tokenize(row)  # one row alone: the same result
        want = _expected(row, _tokenizer(tiny_dir), data)
        if isinstance(got, Skip):
            if want is None:  # RewardDataset drops a prompt too long for max_len silently; we name it
                assert got.reason == "prompt_too_long"
            elif want == "no_shared_prompt":
                assert got.reason == "no_shared_prompt"
            else:  # rows RewardDataset keeps that scoring cannot use
                assert got.reason in ("empty_prompt", "prompt_too_long", "identical_responses"), (got, want)
            continue
        assert got == want, (case, row)
        assert got[1][-1] == got[2][-1] == row_tok.tokenizer.eos_token_id  # EOS forced at the end
        assert len(got[1]) <= data.max_len and len(got[2]) <= data.max_len
        compared += 1
    if case == "plain_no_prompt":  # no prompt column: every row has an empty prompt (RewardDataset keeps them)
        assert compared == 0 and all(g.reason == "empty_prompt" for g in batched)
    else:
        assert compared >= 2
    # encode_many adds the identical-responses skip and nothing else.
    for tokenized, encoded in zip(batched, row_tok.encode_many(rows)):
        if not isinstance(tokenized, Skip) and tokenized[1] == tokenized[2]:
            assert encoded == Skip("identical_responses", "chosen and rejected are identical")
        else:
            assert encoded == tokenized


def test_truncated_rows_are_cut_at_max_len_with_eos_last(tiny_dir):
    tok = _tokenizer(tiny_dir)
    data = _data(prompt_key="prompt", max_len=24)
    row = {"prompt": "Write a note.", "chosen": "word " * 80, "rejected": "the lake"}
    prompt_len, chosen, rejected = RowTokenizer(tok, DataStrategy(data, quiet=True)).encode(row)
    assert len(chosen) == 24 and chosen[-1] == tok.eos_token_id and rejected[-1] == tok.eos_token_id
    assert (prompt_len, chosen, rejected) == _reward_dataset_row(row, tok, data)
    # At the boundary of process_data's rule: a prompt of max_len - 2 tokens is dropped, one of max_len - 3 kept.
    n_prompt = len(tok(row["prompt"], add_special_tokens=False)["input_ids"])
    for max_len, kept in ((n_prompt + 2, False), (n_prompt + 3, True)):
        data = _data(prompt_key="prompt", max_len=max_len)
        got = RowTokenizer(tok, DataStrategy(data, quiet=True)).encode(row)
        want = _reward_dataset_row(row, tok, data)
        assert (got == want) if kept else (want is None and got.reason == "prompt_too_long")


def test_every_skip_reason_is_named_in_a_batch_as_one_row_at_a_time(tiny_dir):
    tok = _tokenizer(tiny_dir)
    row_tok = RowTokenizer(tok, DataStrategy(_data(prompt_key="prompt"), quiet=True))
    good = {"prompt": "Write a note.", "chosen": "The river is clear.", "rejected": "The river is wrong."}
    rows = [good, {"prompt": "Write a note.", "chosen": "A."}, {**good, "chosen": 3.5}, {**good, "rejected": "  \n "},
            {**good, "prompt": "the river " * 60}, {**good, "rejected": good["chosen"]}, {**good, "prompt": ""}, good]
    got = row_tok.encode_many(rows)
    assert [g.reason if isinstance(g, Skip) else "kept" for g in got] == [
        "kept", "missing_key", "non_text", "empty_response", "prompt_too_long", "identical_responses", "empty_prompt",
        "kept"]
    assert got == [row_tok.encode(r) for r in rows]  # messages included
    assert row_tok.encode_many([]) == []
    assert row_tok.encode_many([rows[4]]) == [got[4]]  # a batch where every row is dropped by process_data


def test_cross_row_tokenizer_batched_equals_one_row_at_a_time(tiny_dir, tmp_path):
    tok300 = str(tmp_path / "tok300")
    tiny.build_tokenizer(tok300, 300)
    data = _data(apply_chat_template=True, max_len=96)
    policy = RowTokenizer(_tokenizer(tiny_dir), DataStrategy(data, quiet=True))
    oracle = RowTokenizer(_tokenizer(tmp_path, "tok300"), DataStrategy(data, quiet=True))
    cross = CrossRowTokenizer(policy, oracle)
    rows = _chat_rows()
    batched = cross.encode_many(rows)
    kept = 0
    for row, got in zip(rows, batched):
        one = cross.encode(row)
        if isinstance(got, Skip):
            assert got == one
            continue
        kept += 1
        assert got[:3] == one[:3] and got[3] == one[3] == policy.encode(row)  # oracle ids, policy ids
        assert got[3] == _reward_dataset_row(row, policy.tokenizer, data)
        for side, a, b in zip((1, 2), got[4], one[4]):  # the token maps move the same scores the same way
            scores = torch.randn(len(got[side]) - got[0])
            torch.testing.assert_close(a.apply(scores), b.apply(scores), rtol=0, atol=0)
    assert kept >= 3


# ----------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def scoring_assets(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    oracle = str(root / "oracle")
    tiny.build_model(oracle, os.path.join(tiny_dir, "tokenizer"), seed=1)
    rows = [json.loads(line) for line in open(tiny.write_preference_data(str(root / "good.jsonl"), 20, seed=3))]
    too_long = {"chosen": _msgs("the river " * 80, "Clear."), "rejected": _msgs("the river " * 80, "Wrong.")}
    for i, bad in ((2, too_long), (9, _chat_rows()[4]), (13, {"chosen": _msgs("Write.", "A.")})):
        rows.insert(i, bad)
    data = str(root / "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"root": root, "oracle": oracle, "ref": os.path.join(tiny_dir, "base"), "data": data, "n_rows": len(rows)}


def _score(assets, out, *extra):
    from openrlhf_sepo.cli import score_tokens

    return score_tokens.main(["--oracle.model_name_or_path", assets["oracle"], "--ref.model_name_or_path",
                              assets["ref"], "--data.dataset", assets["data"], "--data.apply_chat_template",
                              "--data.max_len", "96", "--score.micro_batch_size", "3", "--score.shard_size", "5",
                              "--output_dir", str(out), *extra])


def test_scores_prepared_ahead_equal_scores_prepared_inline(scoring_assets, tmp_path):
    import pyarrow.parquet as pq

    manifests, tables = {}, {}
    for ahead in (0, 1, 3):
        out = tmp_path / f"ahead{ahead}"
        manifests[ahead] = _score(scoring_assets, out, "--score.tokenize_ahead", str(ahead))
        tables[ahead] = [pq.read_table(os.path.join(out, "data", name)) for name in sorted(os.listdir(out / "data"))]
        with open(out / "shards" / "shard-00000.json") as f:
            assert json.load(f)["tokenize_s"] > 0
    assert len(tables[0]) == 5  # 23 rows in shards of 5
    for ahead in (1, 3):
        assert all(a.equals(b) for a, b in zip(tables[0], tables[ahead]))  # bit-identical scores and ids
        for key in ("run_id", "counts", "score_stats", "selection"):
            assert manifests[ahead][key] == manifests[0][key], key
        assert manifests[ahead]["score"]["tokenize_ahead"] == ahead
    m = manifests[1]
    assert m["counts"]["skipped_by_reason"]["prompt_too_long"] == 1 and m["counts"]["skipped_by_reason"]["missing_key"] == 1
    assert [e["index"] for e in m["counts"]["skipped_examples"]["identical_responses"]] == [9]
    timing = m["timing"]
    assert timing["tokenize_s_all_shards"] > 0 and 0 <= timing["tokenize_wait_s_all_shards"] <= timing["elapsed_s"]


def test_a_row_that_fails_to_tokenize_is_named_by_its_index(scoring_assets, tmp_path, monkeypatch):
    real = RowTokenizer.encode_many

    def failing(self, rows):
        if any(r.get("prompt") == "boom" for r in rows):
            raise KeyError("boom")
        return real(self, rows)

    monkeypatch.setattr(RowTokenizer, "encode_many", failing)
    rows = [json.loads(line) for line in open(scoring_assets["data"])]
    rows[7]["prompt"] = "boom"
    data = str(tmp_path / "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for ahead in ("0", "1"):  # raised in the prefetch thread, it reaches the caller the same way
        with pytest.raises(RuntimeError, match="row 7: cannot tokenize it as train_dpo would: KeyError"):
            _score({**scoring_assets, "data": data}, tmp_path / f"out{ahead}", "--score.tokenize_ahead", ahead)


def test_tokenize_ahead_flag():
    from openrlhf_sepo.cli import score_tokens

    base = ["--oracle.model_name_or_path", "o", "--ref.model_name_or_path", "r", "--data.dataset", "d", "--output_dir", "x"]
    assert score_tokens.parse_args(base).score.tokenize_ahead == 1
    with pytest.raises(SystemExit, match="--score.tokenize_ahead must be >= 0"):
        score_tokens.parse_args(base + ["--score.tokenize_ahead", "-1"])


def test_non_finite_scores_name_their_row(scoring_assets, tmp_path, monkeypatch):
    from openrlhf_sepo import score_tokens as engine

    rows = [json.loads(line) for line in open(scoring_assets["data"])]
    target = engine.RowTokenizer(_tokenizer(os.path.dirname(scoring_assets["ref"])),
                                 DataStrategy(_data(apply_chat_template=True, max_len=96), quiet=True)).encode(rows[6])[1]
    real = engine.make_scorer

    def make_scorer(args, device):
        score = real(args, device)

        def nan_for_row_6(ids, mask, prompt_lens, lengths):
            out = score(ids, mask, prompt_lens, lengths)
            return [s * float("nan") if ids[i, :n].tolist() == target else s for i, (s, n) in enumerate(zip(out, lengths))]

        return nan_for_row_6

    monkeypatch.setattr(engine, "make_scorer", make_scorer)
    with pytest.raises(RuntimeError, match=r"row 6: non-finite token scores \(try --ds.param_dtype fp32\)"):
        _score(scoring_assets, tmp_path / "out")

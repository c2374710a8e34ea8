"""Preference pairs with no prompt column (Anthropic HH-RLHF shape): ``openrlhf_sepo.hh.split_prompt``, and
``--data.prompt_split`` in score_tokens (through the CPU runtime) and in evaluate's pairwise accuracy."""

import json
import os

import pytest

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import tiny
from openrlhf_sepo.hh import DEFAULT_MARKER, marker_arg, split_prompt

M = DEFAULT_MARKER  # "\n\nAssistant:"


def hh(*turns):
    """ "\\n\\nHuman: u1\\n\\nAssistant: a1\\n\\nHuman: u2..." from alternating user / assistant texts."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def msgs(*turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ----------------------------------------------------------------------------------------------- split_prompt


@pytest.mark.parametrize("mode", ["marker", "common_prefix"])
def test_single_and_multi_turn_strings(mode):
    single = split_prompt(hh("Hi there.", "Hello, how can I help?"), hh("Hi there.", "Go away."), mode)
    assert single == ("\n\nHuman: Hi there." + M, " Hello, how can I help?", " Go away.")
    # Multi-turn: the earlier exchange is part of the prompt; the split is at the LAST assistant turn.
    earlier = ("Hi.", "Hello.", "Tell me a joke.")
    chosen, rejected = hh(*earlier, "Why did the chicken cross the road?"), hh(*earlier, "No.")
    assert split_prompt(chosen, rejected, mode) == (hh(*earlier) + M, " Why did the chicken cross the road?", " No.")
    # Answers that begin alike: still cut at the marker, not inside the answers.
    prompt, c, r = split_prompt(hh("Q?", "Sure, here it is."), hh("Q?", "Sure, no."), mode)
    assert (prompt, c, r) == ("\n\nHuman: Q?" + M, " Sure, here it is.", " Sure, no.")


def test_common_prefix_without_a_marker_cuts_at_whitespace():
    # Shared text up to a word boundary: the prompt ends before that whitespace, the answers start with it.
    assert split_prompt("Tell me a joke. Why did it", "Tell me a joke. No.", "common_prefix") == (
        "Tell me a joke.", " Why did it", " No.")
    # Sides that diverge inside a word: back to the whitespace before that word (no word is split).
    assert split_prompt("Say worldly things", "Say worlds apart", "common_prefix") == (
        "Say", " worldly things", " worlds apart")
    assert split_prompt("Say  worldly", "Say  worlds", "common_prefix") == ("Say", "  worldly", "  worlds")
    # A marker of one's own.
    assert split_prompt("User: hi\nBot: yes", "User: hi\nBot: no", "common_prefix", marker="\nBot:") == (
        "User: hi\nBot:", " yes", " no")
    assert split_prompt("User: hi\nBot: yes", "User: hi\nBot: no", "marker", marker="\nBot:") == (
        "User: hi\nBot:", " yes", " no")


@pytest.mark.parametrize("mode", ["marker", "common_prefix"])
def test_no_shared_prompt(mode):
    assert split_prompt("Hello there.", "Goodbye.", mode) is None  # nothing shared
    assert split_prompt(hh("A?", "x"), hh("B?", "y"), mode) is None  # part in the first user turn
    assert split_prompt("Hello", "Help", mode) is None  # a shared word part, no whitespace before it
    assert split_prompt(msgs("A?", "x"), msgs("B?", "y"), mode) is None  # earlier messages differ
    assert split_prompt(msgs("A?"), msgs("A?"), mode) is None  # no assistant answer
    assert split_prompt(msgs("A?", "x", "more?"), msgs("A?", "x", "less?"), mode) is None  # last is the user's


def test_marker_mode_needs_the_marker_and_the_same_prompt():
    assert split_prompt("Human: hi. Bot: yes", "Human: hi. Bot: no", "marker") is None  # marker missing
    # The rejected dialogue diverges before chosen's last assistant turn.
    assert split_prompt(hh("A?", "x", "B?", "y"), hh("A?", "z", "B?", "w"), "marker") is None
    # common_prefix splits where the sides part instead: the answers are everything from that assistant turn on.
    assert split_prompt(hh("A?", "x", "B?", "y"), hh("A?", "z", "B?", "w"), "common_prefix") == (
        "\n\nHuman: A?" + M, " x\n\nHuman: B?" + M + " y", " z\n\nHuman: B?" + M + " w")
    # The rejected side may contain more markers after the shared prompt.
    assert split_prompt(hh("A?", "x"), hh("A?", "y") + M + " again", "marker") == (
        "\n\nHuman: A?" + M, " x", " y" + M + " again")


@pytest.mark.parametrize("mode", ["marker", "common_prefix"])
def test_message_lists(mode):
    assert split_prompt(msgs("A?", "yes"), msgs("A?", "no"), mode) == (msgs("A?"), msgs("A?", "yes")[1:],
                                                                       msgs("A?", "no")[1:])
    prompt, c, r = split_prompt(msgs("A?", "x", "B?", "yes"), msgs("A?", "x", "B?", "no"), mode)
    assert prompt == msgs("A?", "x", "B?") and c == [{"role": "assistant", "content": "yes"}]
    assert r == [{"role": "assistant", "content": "no"}]


def test_bad_mode_and_marker_flag():
    with pytest.raises(ValueError, match="mode"):
        split_prompt("a b", "a c", "none")
    assert marker_arg("\\n\\nAssistant:") == "\n\nAssistant:" and marker_arg(M) == M


# ----------------------------------------------------------------------------------------------- tiny HH data

N_SINGLE, N_MULTI = 6, 6
NO_SHARED, IDENTICAL = N_SINGLE + N_MULTI, N_SINGLE + N_MULTI + 1


def hh_rows():
    """(rows, expected) from tiny.make_pairs: single-turn rows, multi-turn rows (an earlier exchange first), a row
    whose sides share no prompt, one with identical sides; expected[i] = (prompt, chosen answer, rejected answer)."""
    pairs = tiny.make_pairs(N_SINGLE + N_MULTI + 1, seed=5)
    rows, expected = [], []
    for i, p in enumerate(pairs[: N_SINGLE + N_MULTI]):
        before = hh(pairs[i + 1]["prompt"], pairs[i + 1]["chosen"]) if i >= N_SINGLE else ""
        prompt = before + f"\n\nHuman: {p['prompt']}" + M
        rows.append({"chosen": f"{prompt} {p['chosen']}", "rejected": f"{prompt} {p['rejected']}"})
        expected.append((prompt, " " + p["chosen"], " " + p["rejected"]))
    rows.append({"chosen": hh("Write a note about the river.", "The river is clear."),
                 "rejected": hh("Write a note about the lake.", "The lake is clear.")})
    rows.append({"chosen": hh("Write a note.", "The river is clear."), "rejected": hh("Write a note.", "The river is clear.")})
    return rows, expected


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hh") / "hh.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh_rows()[0])
    return path


def _tokenizer(tiny_dir):
    from openrlhf.utils import get_tokenizer

    return get_tokenizer(os.path.join(tiny_dir, "tokenizer"), None, "right", None)


def _row_tokenizer(tiny_dir, *flags):
    from openrlhf_sepo.cli import score_tokens
    from openrlhf_sepo.rows import DataStrategy, RowTokenizer

    base = os.path.join(tiny_dir, "base")
    args = score_tokens.parse_args(["--oracle.model_name_or_path", base, "--ref.model_name_or_path", base,
                                    "--data.dataset", "unused", "--output_dir", "unused", "--data.max_len", "128", *flags])
    return RowTokenizer(_tokenizer(tiny_dir), DataStrategy(args.data, quiet=True))


def test_row_tokenizer_splits_strings_and_message_lists(tiny_dir):
    rows, expected = hh_rows()
    none = _row_tokenizer(tiny_dir)
    assert none.encode(rows[0])[0] == "empty_prompt"  # today's behaviour, still the default
    marker = _row_tokenizer(tiny_dir, "--data.prompt_split", "marker")
    tok = marker.tokenizer
    prompt_len, chosen_ids, rejected_ids = marker.encode(rows[N_SINGLE])  # multi-turn
    prompt_ids = tok(expected[N_SINGLE][0], add_special_tokens=False)["input_ids"]
    assert prompt_len == len(prompt_ids) and chosen_ids[:prompt_len] == prompt_ids
    assert tok.decode(chosen_ids[prompt_len:-1]).strip() == expected[N_SINGLE][1].strip()
    assert chosen_ids[-1] == rejected_ids[-1] == tok.eos_token_id
    assert marker.encode(rows[NO_SHARED])[0] == "no_shared_prompt"
    assert marker.encode(rows[IDENTICAL])[0] == "identical_responses"
    assert marker.encode({"chosen": hh("Q?", "   "), "rejected": hh("Q?", "no")})[0] == "empty_response"
    with pytest.raises(SystemExit, match="drop --data.prompt_key"):
        _row_tokenizer(tiny_dir, "--data.prompt_split", "marker", "--data.prompt_key", "prompt")

    # Message lists, through the chat template: the prompt is every message before the last assistant answer.
    chat = _row_tokenizer(tiny_dir, "--data.prompt_split", "common_prefix", "--data.apply_chat_template")
    row = {"chosen": msgs("Write a note.", "The river is clear.", "Again?", "The lake is calm."),
           "rejected": msgs("Write a note.", "The river is clear.", "Again?", "The lake is cold.")}
    prompt_len, chosen_ids, _ = chat.encode(row)
    prompt_text = tok.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
    assert prompt_len == len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert "The lake is calm." in tok.decode(chosen_ids[prompt_len:]) and "river" not in tok.decode(chosen_ids[prompt_len:])
    row["rejected"] = msgs("Write another note.", "The river is clear.", "Again?", "The lake is cold.")
    assert chat.encode(row)[0] == "no_shared_prompt"


@pytest.mark.slow
def test_score_tokens_keeps_hh_rows_and_scores_the_final_answers(tiny_dir, hh_file, run, tmp_path):
    from datasets import Dataset, load_dataset
    from openrlhf.datasets import RewardDataset

    from openrlhf_sepo.rows import DataStrategy
    from openrlhf_sepo.cli.evaluate import DataFlags

    base = os.path.join(tiny_dir, "base")
    out = str(tmp_path / "scores")
    # The marker typed as on a command line (backslash-n): the flag reads it as newlines.
    proc = run("openrlhf_sepo.cli.score_tokens", [
        "--oracle.model_name_or_path", base, "--ref.model_name_or_path", base, "--data.dataset", hh_file,
        "--data.prompt_split", "marker", "--data.assistant_marker", "\\n\\nAssistant:", "--data.max_len", "128",
        "--ds.attn_implementation", "sdpa", "--output_dir", out])
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    counts = m["counts"]
    assert (counts["pairs_read"], counts["pairs_kept"]) == (N_SINGLE + N_MULTI + 2, N_SINGLE + N_MULTI)
    assert counts["skipped_by_reason"]["empty_prompt"] == 0
    assert counts["skipped_by_reason"]["no_shared_prompt"] == 1 and counts["skipped_by_reason"]["identical_responses"] == 1
    assert counts["skipped_examples"]["no_shared_prompt"][0]["index"] == NO_SHARED
    assert f"no_shared_prompt (e.g. row {NO_SHARED}" in proc.stdout
    assert m["data"]["prompt_split"] == "marker" and m["data"]["assistant_marker"] == M

    records = sorted(load_dataset("parquet", data_dir=os.path.join(out, "data"), split="train"), key=lambda r: r["index"])
    assert [r["index"] for r in records] == list(range(N_SINGLE + N_MULTI))
    _, expected = hh_rows()
    tok = _tokenizer(tiny_dir)
    for r, (prompt, chosen, rejected) in zip(records, expected):
        p = r["prompt_len"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        # The prompt covers everything up to the final answer; the response ids are that answer + EOS.
        assert p == len(prompt_ids) and r["chosen_input_ids"][:p] == prompt_ids == r["rejected_input_ids"][:p]
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            ids = r[f"{side}_input_ids"]
            assert tok.decode(ids[p:-1], skip_special_tokens=True).strip() == answer.strip()
            assert ids[-1] == tok.eos_token_id and len(r[f"{side}_scores"]) == len(ids) - p
    # Exactly the ids OpenRLHF's RewardDataset(is_dpo=True) makes of the pre-split rows with a prompt key.
    split_rows = [dict(zip(("prompt", "chosen", "rejected"), e)) for e in expected]
    ds = RewardDataset(Dataset.from_list(split_rows), tok, 128, DataStrategy(DataFlags(prompt_key="prompt"), quiet=True),
                       is_dpo=True, num_processors=1)
    for r, (c_ids, _, r_ids, _, p) in zip(records, (ds[i] for i in range(len(ds)))):
        assert (r["chosen_input_ids"], r["rejected_input_ids"], r["prompt_len"]) == (c_ids[0].tolist(), r_ids[0].tolist(), p)

    # ... and SePO trains on them without a prompt column: the final answers are the responses.
    train = run("openrlhf_sepo.cli.train_sepo", [
        "--model.model_name_or_path", base, "--data.dataset", out, "--data.max_len", "128", "--train.batch_size", "4",
        "--train.micro_batch_size", "2", "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "0",
        "--ckpt.output_dir", str(tmp_path / "policy")])
    assert f"TokenScoreDataset: {N_SINGLE + N_MULTI} pairs" in train.stdout
    assert os.path.isfile(os.path.join(str(tmp_path / "policy"), "config.json"))


def test_evaluate_reads_hh_rows(tiny_dir, hh_file, tmp_path):
    from openrlhf_sepo.cli import evaluate as ev

    rows, expected = hh_rows()
    model, tokenizer = ev.load_policy(os.path.join(tiny_dir, "base"))
    got = ev.pairwise_accuracy(model, tokenizer, rows, ev.DataFlags(prompt_split="marker", max_len=128), batch_size=4)
    assert got["n_pairs"] == len(rows) - 1 and got["n_no_shared_prompt"] == 1  # the identical row counts (margin 0)
    split_rows = [dict(zip(("prompt", "chosen", "rejected"), e)) for e in expected] + [
        dict(zip(("prompt", "chosen", "rejected"), split_prompt(rows[IDENTICAL]["chosen"], rows[IDENTICAL]["rejected"], "marker")))]
    want = ev.pairwise_accuracy(model, tokenizer, split_rows, ev.DataFlags(prompt_key="prompt", max_len=128), batch_size=4)
    assert got["margins"] == pytest.approx(want["margins"], abs=1e-6) and got["margins"][-1] == pytest.approx(0, abs=1e-6)
    prompts = list(dict.fromkeys([e[0] for e in expected] + [hh("Write a note.") + M]))  # distinct, in order
    assert ev.preference_prompts(rows, ev.DataFlags(prompt_split="common_prefix")) == prompts

    # The CLI: flags, pairwise accuracy and generation from the split prompts.
    report = tmp_path / "report.json"
    assert ev.main(["--models", f"base={os.path.join(tiny_dir, 'base')}", "--data.dataset", hh_file,
                    "--data.prompt_split", "marker", "--data.max_len", "128", "--gen.n_prompts", "2",
                    "--gen.max_new_tokens", "4", "--reward", "ground_truth", "--output", str(report)]) == 0
    m = json.loads(report.read_text())["models"]["base"]
    assert m["n_pairs"] == len(rows) - 1 and m["n_no_shared_prompt"] == 1
    assert m["samples"][0]["prompt"] == expected[0][0]
    assert ev.main(["--models", f"base={os.path.join(tiny_dir, 'base')}", "--data.dataset", hh_file,
                    "--data.prompt_split", "marker", "--data.prompt_key", "prompt", "--gen.n_prompts", "0"]) == 2

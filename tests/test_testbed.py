"""The testbed task family (openrlhf_sepo.testbed): every knob does what its docstring says, the truth is exact at
the token level, and tiny's saturated variants are unchanged, byte for byte."""

import hashlib
import json
import statistics

import pytest

from openrlhf_sepo import testbed as tb
from openrlhf_sepo import tiny


def _md5(rows):
    return hashlib.md5(json.dumps(rows).encode()).hexdigest()


def test_tiny_variants_are_unchanged_byte_for_byte():
    # Digests of tiny's generators as they were before the testbed was added (commit d847621).
    expected = {"independent": "e4261eebb392d44c0179c64b92617ead", "shared": "7ac8b29820cd939d220c616c44df6b72",
                "mixed": "0972c8b24d886ea3e11744875b650903"}
    for variant, digest in expected.items():
        assert _md5(tiny.make_pairs(64, seed=3, variant=variant, label_noise=0.1)) == digest
    assert _md5(tiny.make_sft_rows(64, seed=3)) == "e0c82b969dea0da748be2cbdb308519e"
    assert _md5(tiny.make_prompts(64, seed=3)) == "3970519e6b16246c17192f9c23f4aafd"


def test_generators_are_deterministic_and_seeded():
    task = tb.Task()
    assert tb.make_pairs(20, task, seed=5) == tb.make_pairs(20, task, seed=5)
    assert tb.make_pairs(20, task, seed=5) != tb.make_pairs(20, task, seed=6)
    assert tb.make_sft_rows(10, task, seed=1) == tb.make_sft_rows(10, task, seed=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tb.build_tokenizer(str(tmp_path_factory.mktemp("tok")), tb.Task())


def _signs(tok, prompt, text, task):
    ids = tok(text, add_special_tokens=False).input_ids
    return tok.convert_ids_to_tokens(ids), tb.token_signs(tok.convert_ids_to_tokens(ids), prompt, task)


def test_default_task_is_long_and_sparse(tokenizer):
    task = tb.Task()
    rows = tb.make_pairs(200, task, seed=2)
    lengths, key_share = [], []
    for row in rows:
        for side in ("chosen", "rejected"):
            pieces, signs = _signs(tokenizer, row["prompt"], row[side], task)
            lengths.append(len(pieces))
            key_share.append(sum(s != 0 for s in signs) / len(signs))
    assert statistics.mean(lengths) >= 48
    assert statistics.mean(key_share) <= 0.10
    # every key word is one whole token: the key share is n_keys / tokens
    assert all(sum(s != 0 for s in _signs(tokenizer, r["prompt"], r["chosen"], task)[1]) == task.n_keys
               for r in rows)


@pytest.mark.parametrize("density", [0.03, 0.1, 0.3])
def test_density_sets_the_number_of_key_sentences(density):
    task = tb.Task(density=density, label_noise=0.0)
    for row in tb.make_pairs(10, task, seed=1):
        assert len(tb.parse(row["chosen"], task)) == task.n_keys == max(1, round(density * 64))


def test_context_decides_which_words_are_right():
    task = tb.Task(flaw_rate=0.0, label_noise=0.0, cue=0.0)
    rows = tb.make_pairs(100, task, seed=4)
    by_reader = {}
    for row in rows:
        reader = tb.reader_of(row["prompt"])
        by_reader.setdefault(reader, set()).update(tb.parse(row["chosen"], task))
        assert tb.ground_truth_reward(row["prompt"], row["chosen"], task) == 1.0
        assert tb.ground_truth_reward(row["prompt"], row["rejected"], task) == -1.0
    assert by_reader["young"] <= set(tb.READERS["young"]) and by_reader["expert"] <= set(tb.READERS["expert"])
    # the same answer is right for one reader and wrong for the other: no global word preference solves it
    answer = rows[0]["chosen"]
    young = "Write a short note about the lake for young readers."
    expert = "Write a short note about the lake for expert readers."
    assert tb.ground_truth_reward(young, answer, task) == -tb.ground_truth_reward(expert, answer, task) != 0
    # held-out topics still have a defined right answer
    prompt = tb.make_prompts(1, task, seed=0, split="test")[0]["prompt"]
    assert prompt.split("the ")[1].split()[0] in tiny.HELD_OUT_TOPICS and tb.reader_of(prompt) in tb.READERS
    # without context: tiny's good and bad words, no reader in the prompt
    flat = tb.Task(context=False, label_noise=0.0)
    row = tb.make_pairs(1, flat, seed=0)[0]
    assert "readers" not in row["prompt"]
    assert set(tb.parse(row["chosen"], flat)) <= set(tiny.GOOD_WORDS + tiny.BAD_WORDS)


def test_flawed_pairs_are_better_on_balance_not_flawless():
    task = tb.Task(flaw_rate=1.0, flaws=0.34, label_noise=0.0, density=0.1)  # 6 keys, 2 flipped
    for row in tb.make_pairs(50, task, seed=3):
        right, wrong = task.key_words(row["prompt"])
        chosen, rejected = tb.parse(row["chosen"], task), tb.parse(row["rejected"], task)
        assert sum(w in wrong for w in chosen) == 2 and sum(w in right for w in rejected) == 2
        assert tb.ground_truth_reward(row["prompt"], row["chosen"], task) > tb.ground_truth_reward(
            row["prompt"], row["rejected"], task)
    clean = tb.make_pairs(50, tb.Task(flaw_rate=0.0, label_noise=0.0), seed=3)
    assert all(tb.ground_truth_reward(r["prompt"], r["chosen"], tb.Task()) == 1.0 for r in clean)


def test_label_noise_swaps_exactly_its_share_and_keeps_the_other_rows():
    task = tb.Task(label_noise=0.0)
    clean = tb.make_pairs(100, task, seed=7)
    noisy = tb.make_pairs(100, task, seed=7, label_noise=0.2)
    swapped = [i for i, (a, b) in enumerate(zip(clean, noisy)) if a != b]
    assert len(swapped) == 20
    assert all(noisy[i]["chosen"] == clean[i]["rejected"] for i in swapped)


def test_spurious_cue_goes_with_preference_but_not_with_truth():
    task = tb.Task(cue=0.3, flaw_rate=0.0, label_noise=0.0)
    rows = tb.make_pairs(200, task, seed=1)
    chosen = statistics.mean(tb.cue_rate(r["chosen"], task) for r in rows)
    rejected = statistics.mean(tb.cue_rate(r["rejected"], task) for r in rows)
    assert 0.2 < chosen < 0.4 and rejected == 0.0
    sft = statistics.mean(tb.cue_rate(r["response"], task) for r in tb.make_sft_rows(200, task, seed=1))
    assert 0.08 < sft < 0.22  # cue / 2
    # the truth ignores the cue: replacing filler with cue words changes nothing
    prompt = rows[0]["prompt"]
    text = rows[0]["rejected"]
    cued = text.replace(" the ", " indeed ").replace(" a ", " truly ").replace(" of ", " quite ")
    assert cued != text and tb.ground_truth_reward(prompt, cued, task) == tb.ground_truth_reward(prompt, text, task)
    assert tb.is_well_formed(cued, task)
    off = tb.Task(cue=0.0)
    assert all(tb.cue_rate(r["chosen"], off) == 0.0 for r in tb.make_pairs(50, off, seed=1))


def test_format_and_reward_rules():
    task = tb.Task(density=0.03)  # 2 keys
    prompt = "Write a short note about the lake for young readers."
    good = "The lake is calm water indeed. My note is young simple young playful."
    assert tb.parse(good, task) == ["simple", "playful"]
    assert tb.ground_truth_reward(prompt, good, task) == 1.0
    assert tb.ground_truth_reward(prompt, good.replace(" young playful", ""), task) == 0.5  # a missing key costs
    extra = good.replace("playful", "playful young technical")  # an extra wrong key word gains nothing
    assert tb.is_well_formed(extra, task) and tb.ground_truth_reward(prompt, extra, task) == pytest.approx(1 / 3)
    # the reader the answer restates does not change the truth: the prompt's reader does
    assert tb.ground_truth_reward(prompt, good.replace("young", "expert"), task) == 1.0
    for bad in ("The lake is calm water. My note is.", "The lake is. My note is young simple.",
                "lake is calm. My note is young simple.", good[:-1], good.replace("calm", "unknownword"),
                good.replace("simple", "calm"), good.replace("young simple", "old simple"),
                good.replace("young simple", "simple"), good.replace(" My note", "")):
        assert not tb.is_well_formed(bad, task), bad
    assert tb.is_well_formed("The lake is calm. My note is accurate kind.", tb.Task(context=False))
    assert not tb.is_well_formed("The lake is calm. My note is young accurate.", tb.Task(context=False))
    with pytest.raises(ValueError, match="no reader"):
        tb.ground_truth_reward("Write a short note about the lake.", good, task)


def test_token_signs_are_exact_when_bpe_splits_a_word(tokenizer):
    task = tb.Task()
    prompt = "Write a short note about the lake for expert readers."
    text = "The lake is calm water. My note is expert scholarly expert playful."
    pieces = ["\u2581The", "\u2581lake", "\u2581is", "\u2581calm", "\u2581water.", "\u2581My", "\u2581note",
              "\u2581is", "\u2581expert", "\u2581schol", "arly", "\u2581expert", "\u2581play", "ful."]
    assert "".join(pieces).replace("\u2581", " ").strip() == text
    assert tb.token_signs(pieces, prompt, task) == [0] * 9 + [1, 1, 0, -1, -1]
    pieces, signs = _signs(tokenizer, prompt, text, task)
    # one token carries the key word
    assert [p for p, s in zip(pieces, signs) if s == 1] == ["\u2581scholarly"]


@pytest.mark.parametrize("knob, value", [("length", 4), ("density", 0.0), ("flaw_rate", 1.5), ("flaws", 0.5),
                                         ("label_noise", 0.5), ("cue", -0.1)])
def test_bad_knobs_are_refused_by_name(knob, value):
    with pytest.raises(ValueError, match=f"testbed task: {knob} must be"):
        tb.Task(**{knob: value})


def test_demo_flags_reach_the_task_and_bad_ones_name_the_flag(tmp_path):
    from openrlhf_sepo.bench import keywords
    from openrlhf_sepo.cli import demo

    args = demo.build_parser().parse_args(["--output_dir", str(tmp_path), "--flaws", "0.6"])
    with pytest.raises(SystemExit, match="--flaws must be in"):
        keywords.run(args)
    assert tb.task_from_json(json.dumps(tb.Task(cue=0.1).as_dict())) == tb.Task(cue=0.1)

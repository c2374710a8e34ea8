"""The embedded task's variants, truth and template parser, the demo's statistics, and the reduced demo end
to end (--quick: 2 seeds, the controls and weak-to-strong included), with every metric finite and a rerun that
skips every finished job."""

import json
import math
import os
import subprocess
import sys

import pytest

from openrlhf_sepo import tiny
from openrlhf_sepo.bench.keywords import METHODS, SETTINGS_FILE, KeywordSpec, gated_reward
from openrlhf_sepo.bench.runner import point_label
from openrlhf_sepo.bench.stats import mean_ci95, paired_differences


def test_key_token_mask_is_exact_on_split_and_planted_words():
    # "is" is a substring of "misleading" but not a key word; a BPE-split key word marks all its pieces.
    pieces = ["The", "\u2581river", "\u2581is", "\u2581mis", "leading", "\u2581this", "\u2581kind.", "</s>"]
    assert tiny.key_token_mask(pieces) == [False, False, False, True, True, False, True, False]


def _key_words(text):
    return [w.strip(".") for w in text.split() if w.strip(".") in tiny.GOOD_WORDS + tiny.BAD_WORDS]


def test_shared_pairs_differ_only_in_the_key_span():
    for row in tiny.make_pairs(20, seed=3, variant="shared"):
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected)
        diff = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert diff == list(range(len(chosen) - tiny.N_SLOTS, len(chosen)))
        assert tiny.ground_truth_reward(row["chosen"]) == 1.0 and tiny.ground_truth_reward(row["rejected"]) == -1.0


def test_independent_pairs_draw_their_own_filler_and_keep_the_planted_truth(tiny_dir):
    from transformers import AutoTokenizer

    tiny_tokenizer = AutoTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer"))
    rows = tiny.make_pairs(40, seed=5)  # the default variant
    assert rows == tiny.make_pairs(40, seed=5, variant="independent")
    differ = sum(tiny.parse_answer(r["chosen"])["filler"] != tiny.parse_answer(r["rejected"])["filler"] for r in rows)
    assert differ >= 35  # own filler words and length (equal only by chance)
    for row in rows:
        assert tiny.parse_answer(row["chosen"])["topic"] == tiny.parse_answer(row["rejected"])["topic"]
        assert tiny.ground_truth_reward(row["chosen"]) == 1.0 and tiny.ground_truth_reward(row["rejected"]) == -1.0
        for side, words in (("chosen", tiny.GOOD_WORDS), ("rejected", tiny.BAD_WORDS)):
            ids = tiny_tokenizer(row[side], add_special_tokens=False)["input_ids"]
            pieces = tiny_tokenizer.convert_ids_to_tokens(ids)
            marked = "".join(p for p, key in zip(pieces, tiny.key_token_mask(pieces)) if key).replace("\u2581", " ")
            assert marked.split() == [w + "." if i == tiny.N_SLOTS - 1 else w
                                      for i, w in enumerate(_key_words(row[side]))]
            assert all(w in words for w in _key_words(row[side]))


def test_key_token_signs_give_the_true_token_reward():
    pieces = ["The", "\u2581river", "\u2581is", "\u2581mis", "leading", "\u2581this", "\u2581kind.", "</s>"]
    assert tiny.key_token_signs(pieces) == [0, 0, 0, -1, -1, 0, 1, 0]


def test_mixed_pairs_hold_one_wrong_key_word_per_side_and_leave_other_variants_alone():
    rows = tiny.make_pairs(40, seed=9, variant="mixed")
    independent = tiny.make_pairs(40, seed=9)
    for row, plain in zip(rows, independent):
        for side, n_good in (("chosen", tiny.N_SLOTS - 1), ("rejected", 1)):
            words = tiny.parse_answer(row[side])["key_words"]
            assert sum(w in tiny.GOOD_WORDS for w in words) == n_good, row[side]
        assert tiny.ground_truth_reward(row["chosen"]) == 0.5 and tiny.ground_truth_reward(row["rejected"]) == -0.5
    assert rows == tiny.make_pairs(40, seed=9, variant="mixed")
    assert independent != rows and all(tiny.ground_truth_reward(r["chosen"]) == 1.0 for r in independent)


def test_label_noise_flips_exactly_the_asked_fraction_and_nothing_else():
    clean = tiny.make_pairs(50, seed=7)
    noisy = tiny.make_pairs(50, seed=7, label_noise=0.2)
    flipped = [i for i, (a, b) in enumerate(zip(clean, noisy)) if a != b]
    assert len(flipped) == 10
    for i in flipped:
        assert noisy[i]["chosen"] == clean[i]["rejected"] and noisy[i]["rejected"] == clean[i]["chosen"]
    assert noisy == tiny.make_pairs(50, seed=7, label_noise=0.2)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_noise"):
            tiny.make_pairs(5, label_noise=bad)
    with pytest.raises(ValueError, match="variant"):
        tiny.make_pairs(5, variant="nope")


def test_answer_template_parser():
    for row in tiny.make_pairs(20, seed=1) + tiny.make_pairs(20, seed=1, variant="shared"):
        assert tiny.is_well_formed(row["chosen"]) and tiny.is_well_formed(row["rejected"])
    assert all(tiny.is_well_formed(r["response"]) for r in tiny.make_sft_rows(20))
    assert tiny.parse_answer(" The lake is soft light. My note is clear kind wrong rude. \n") == {
        "topic": "lake", "filler": ["soft", "light"], "key_words": ["clear", "kind", "wrong", "rude"]}
    for text in (
        "The lake is soft light. My note is clear kind wrong.",  # three key words
        "The lake is soft light. My note is clear kind wrong rude kind.",  # five
        "The lake is soft light. My note is clear kind wrong banana.",  # not a key word
        "The lake is castle light. My note is clear kind wrong rude.",  # not a filler word
        "The lake is. My note is clear kind wrong rude.",  # no filler
        "The lake is soft light My note is clear kind wrong rude.",  # missing sentence break
        "morning old some morning long the desert days",  # word salad
        "",
    ):
        assert not tiny.is_well_formed(text), text


def test_prompt_splits_are_disjoint_from_each_other_and_from_training():
    test = {r["prompt"] for r in tiny.make_prompts(100, split="test")}
    validation = {r["prompt"] for r in tiny.make_prompts(100, split="validation")}
    trained = {r["prompt"] for r in tiny.make_pairs(300)} | {r["prompt"] for r in tiny.make_sft_rows(300)}
    assert test and validation and not test & validation and not (test | validation) & trained
    with pytest.raises(ValueError, match="split"):
        tiny.make_prompts(3, split="dev")


def test_mean_ci95_and_gated_reward_by_hand():
    mean, hw = mean_ci95([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.303
    assert mean == 2.0 and hw == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci95([0.5, 0.5])[1] == 0.0 and math.isnan(mean_ci95([0.5])[1])
    samples = [{"reward": 1.0, "well_formed": True}, {"reward": 0.5, "well_formed": False},
               {"reward": -0.5, "well_formed": True}, {"reward": 0.0, "well_formed": False}]
    assert gated_reward(samples) == pytest.approx((1.0 - 1.0 - 0.5 - 1.0) / 4)
    from openrlhf_sepo.bench.keywords import credited_reward  # the testbed's: a malformed answer earns 0

    assert credited_reward(samples) == pytest.approx((1.0 + 0.0 - 0.5 + 0.0) / 4)


def test_paired_differences_are_seed_by_seed_and_keep_the_comparisons_order():
    per_seed = {"a": [1.0, 2.0, 4.0], "b": [0.0, 1.5, 2.5], "c": [5.0, 5.0, 5.0]}
    diffs = paired_differences(per_seed, [("a", "b"), ("missing", "a"), ("c", "a")])
    assert list(diffs) == ["a - b", "c - a"]
    assert diffs["a - b"]["mean"] == pytest.approx(1.0)  # differences 1, 0.5, 1.5: sd 0.5
    assert diffs["a - b"]["ci95"] == pytest.approx(4.303 * 0.5 / math.sqrt(3))
    assert diffs["c - a"] == dict(zip(("mean", "ci95"), mean_ci95([4.0, 3.0, 1.0])))


# Added with the testbed (2026-11-30) and swept on it only: tiny's committed settings predate them; so are the PPO
# arms (2026-12-07).
TESTBED_ONLY = {"confidence", "wmle_truth", "sepo_nll_skip", "sepo_truth_nll_skip", "ppo", "ppo_dense",
                "ppo_dense_token_rm"}


@pytest.mark.parametrize("task", ["independent", "testbed"])
def test_committed_settings_cover_every_method_from_the_grid(task):
    from openrlhf_sepo import testbed
    from openrlhf_sepo.bench import keywords

    spec = KeywordSpec() if task == "independent" else KeywordSpec("testbed", testbed_task=testbed.Task())
    with open(spec.SETTINGS_FILE) as f:
        doc = json.load(f)
    if task == "independent":
        assert set(doc["settings"]) == set(METHODS) - TESTBED_ONLY and set(METHODS) == set(spec.METHODS)
    else:
        assert set(doc["settings"]) >= set(keywords.TESTBED_METHODS) | set(keywords.TESTBED_QUICK_METHODS)
        assert doc["grid"] == keywords.TESTBED_GRID and doc["task"]["variant"] == "testbed"
    for method, setting in doc["settings"].items():
        assert setting in spec.grid_points(method), (method, setting)
        assert set(doc["validation"][method]) == {point_label(p) for p in spec.grid_points(method)}


def test_the_harness_reads_the_spec_it_is_given_not_a_module_global(tmp_path):
    """A spec with its own methods: the harness, the grid and the policy jobs see them (``Demo.METHODS`` was
    meant to be overridden, but eight methods read the module global)."""
    from argparse import Namespace

    from openrlhf_sepo.bench.runner import Benchmark

    class OneMethod(KeywordSpec):
        METHODS = {"only": dict(METHODS["dpo"], nll=0.25)}
        QUICK_METHODS = ["only"]

    args = Namespace(output_dir=str(tmp_path), quick=True, sweep=False, seeds="0,1", methods=None,
                     settings=str(tmp_path / "s.json"), nproc=1)
    (tmp_path / "s.json").write_text(json.dumps({"settings": {"only": {"lr": 0.001, "beta": 0.5}}}))
    bench = Benchmark(OneMethod(), args)
    assert bench.methods == ["only"] and bench.settings == {"only": {"lr": 0.001, "beta": 0.5}}
    assert OneMethod().grid_points("only") == KeywordSpec().grid_points("dpo")
    job = bench.spec.policy_job(bench, 0, "only", "only", bench.settings["only"], snapshots=False)
    assert job["module"] == "openrlhf.cli.train_dpo" and job["args"][job["args"].index("--model.nll_loss_coef") + 1] == "0.25"
    assert job["args"][job["args"].index("--model.beta") + 1] == "0.5"
    with pytest.raises(SystemExit, match="unknown"):
        Benchmark(OneMethod(), Namespace(**{**vars(args), "methods": "sepo"}))


def test_old_import_paths_still_work():
    from openrlhf_sepo.cli import demo, tkpo_benchmark
    from openrlhf_sepo.bench import style

    assert demo.METHODS is METHODS and demo.SETTINGS_FILE == SETTINGS_FILE and demo.mean_ci95 is mean_ci95
    assert demo.gated_reward is gated_reward and demo.point_label is point_label
    assert demo.grid_points("sepo") == KeywordSpec().grid_points("sepo")
    assert tkpo_benchmark.METHODS is style.METHODS and tkpo_benchmark.SETTINGS_FILE == style.SETTINGS_FILE
    assert tkpo_benchmark.grid_points("dpo") == style.StyleSpec().grid_points("dpo")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, run_in_own_group):
    out = str(tmp_path / "demo")
    cmd = [sys.executable, "-m", "openrlhf_sepo.cli.demo", "--output_dir", out, "--quick"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = run_in_own_group(cmd, 1500, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    models = {"sft", "oracle", "sepo", "sepo_random", "sepo_truth", "confidence", "dpo_nll", "simpo", "strong_sft",
              "w2s_sepo", "sepo_token_rm", "wmle", "wmle_onpolicy", "wmle_truth"}
    for key in ("ground_truth_reward", "win_rate_vs_sft", "pairwise_accuracy", "format_validity", "kl_to_sft",
                "cue_rate"):
        assert set(metrics[key]) == models, key
        assert all(math.isfinite(v) for v in metrics[key].values()), (key, metrics[key])
        assert all(math.isfinite(v) for v in metrics["ci95"][key].values()), key
        assert all(len(v) == 2 for v in metrics["per_seed"][key].values())
    assert metrics["kl_to_sft"]["sft"] == 0.0 and metrics["kl_to_sft"]["strong_sft"] == 0.0
    assert set(metrics["selection_precision"]) == {"sepo", "sepo_random", "sepo_truth", "w2s_sepo", "sepo_token_rm"}
    # The truth control selects every planted key token of the side's sign first (k = 0.3 is more than the testbed's
    # density, so its precision is bounded by density / k); random selection sits near the base rate.
    assert metrics["selection_recall"]["sepo_truth"] == 1.0
    assert metrics["selection_precision"]["sepo_truth"] > metrics["selection_precision"]["sepo_random"]
    # (On tiny's task the oracle's selection beat the base rate; on the testbed its credit goes to the spurious cue and
    # its precision sits at or below the base rate, a finding, not a bug: docs/benchmark.md.)
    assert 0.0 <= metrics["selection_precision"]["sepo"] <= 1.0
    assert abs(metrics["selection_precision"]["sepo_random"] - metrics["key_token_base_rate"]) < 0.15
    assert set(metrics["oracle_selection"]["precision"]) == {"0.1", "0.3", "0.5"}
    # both scorers' selection by k, with intervals; the oracle's mean agrees with oracle_selection
    assert set(metrics["scorer_selection"]) == {"oracle", "token_rm"}
    for k, (mean, hw) in metrics["scorer_selection"]["oracle"]["precision"].items():
        assert mean == pytest.approx(metrics["oracle_selection"]["precision"][k]) and math.isfinite(hw)
    assert all(0 <= v[0] <= 1 for v in metrics["scorer_selection"]["token_rm"]["recall"].values())
    # wmle and the loop read every chosen token (weighted): fewer tokens than DPO's both sides
    assert metrics["training_tokens"]["wmle"] == metrics["training_tokens"]["wmle_onpolicy"] < metrics["training_tokens"]["dpo_nll"]
    assert metrics["training_tokens"]["sepo"] < metrics["training_tokens"]["dpo_nll"]
    assert metrics["seeds"] == [0, 1] and metrics["task"]["variant"] == "testbed"
    # the testbed's default task: every knob recorded, long answers, sparse key tokens
    assert {"length", "density", "context", "flaw_rate", "flaws", "label_noise", "cue", "n_keys"} <= set(metrics["task"])
    assert metrics["task"]["mean_response_tokens"] >= 48 and metrics["key_token_base_rate"] <= 0.12
    assert set(metrics["settings"]) == models - {"sft", "oracle", "strong_sft"}
    assert set(metrics["weak_to_strong"]) == {"strong_sft", "w2s_sepo"}
    assert {"sepo - dpo_nll", "sepo - sepo_random", "sepo_truth - sepo", "sepo_token_rm - sepo",
            "wmle_onpolicy - wmle", "sepo_truth - dpo_nll", "wmle_truth - dpo_nll", "sepo - confidence"} <= set(
        metrics["ground_truth_differences"])

    report = open(os.path.join(out, "report.md")).read()
    assert "| sepo_random |" in report and "frontier.png" in report and "± " in report
    for name in ("report.md", "frontier.png", "reward_curve.png", "selection.png", os.path.join("report", "index.html")):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    rerun = run_in_own_group(cmd, 900, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "stage1     0 of 12 jobs to run" in rerun.stdout and "stage2     0 of 20 jobs to run" in rerun.stdout
    assert "loop_r1    0 of 6 jobs to run" in rerun.stdout and "loop_r2    0 of 6 jobs to run" in rerun.stdout
    assert f"[demo] {'eval s1':<10} skipped" in rerun.stdout

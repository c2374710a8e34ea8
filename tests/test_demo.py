"""The main job, reduced (--quick): every stage of the SePO pipeline end to end on the embedded task,
then the report. Checks that the report and metrics exist and are finite, that the oracle's selected
tokens hit the planted key tokens above their base rate, and that a rerun skips every finished stage."""

import json
import math
import os
import subprocess
import sys

import pytest

from openrlhf_sepo import tiny


def test_key_token_mask_is_exact_on_split_and_planted_words():
    # "is" is a substring of "misleading" but not a key word; a BPE-split key word marks all its pieces.
    pieces = ["The", "\u2581river", "\u2581is", "\u2581mis", "leading", "\u2581this", "\u2581kind.", "</s>"]
    assert tiny.key_token_mask(pieces) == [False, False, False, True, True, False, True, False]


def test_pairs_differ_only_in_the_key_span():
    for row in tiny.make_pairs(20, seed=3):
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected)
        diff = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert diff == list(range(len(chosen) - tiny.N_SLOTS, len(chosen)))
        assert tiny.ground_truth_reward(row["chosen"]) == 1.0 and tiny.ground_truth_reward(row["rejected"]) == -1.0
    held_out = {r["prompt"] for r in tiny.make_prompts(50)}
    trained = {r["prompt"] for r in tiny.make_pairs(200)} | {r["prompt"] for r in tiny.make_sft_rows(200)}
    assert held_out and not held_out & trained


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    cmd = [sys.executable, "-m", "openrlhf_sepo.cli.demo", "--output_dir", out, "--quick"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("selection_precision", "key_token_base_rate", "ground_truth_reward", "win_rate_vs_sft", "wall_time_s"):
        assert key in metrics
    values = [metrics["key_token_base_rate"]]
    for key in ("selection_precision", "ground_truth_reward", "win_rate_vs_sft", "wall_time_s"):
        values += list(metrics[key].values())
    assert all(math.isfinite(v) for v in values), metrics
    assert set(metrics["ground_truth_reward"]) >= {"sft", "sepo", "dpo", "simpo"}
    assert set(metrics["selection_precision"]) == {"0.1", "0.3", "0.5"}
    for k, precision in metrics["selection_precision"].items():
        assert precision > metrics["key_token_base_rate"], (k, metrics)

    report = open(os.path.join(out, "report.md")).read()
    assert "| sepo |" in report and "reward_curve.png" in report
    for name in ("report.md", "reward_curve.png", "selection.png", os.path.join("report", "index.html")):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    for stage in ("data", "sft", "oracle", "scores", "sepo", "dpo", "simpo", "evaluate"):
        assert f"[demo] {stage:<8} skipped" in rerun.stdout, rerun.stdout

"""benchmarks/bench_gpu.py at tiny size on the CPU (every row, finite numbers, through the installed OpenRLHF), and
benchmarks/cost_table.py's formulas."""

import importlib.util
import json
import math
import os
import sys


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_gpu = _load("bench_gpu")
cost_table = _load("cost_table")


def test_tiny_cpu_run_prints_every_row_with_finite_numbers(tmp_path, capsys):
    import openrlhf_sepo.trainer

    trainer_before = sys.modules["openrlhf_sepo.trainer"]
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    results = bench_gpu.main(["--device", "cpu", "--tiny", "--json", str(out_json), "--markdown", str(out_md)])
    printed = capsys.readouterr().out
    assert set(results["variants"]) == set(bench_gpu.VARIANTS)
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    for variant in bench_gpu.VARIANTS:
        assert any(line.startswith(f"| {variant} |") for line in rows), variant
    for label in ("scoring.token_scores", "bare forward, full logits", "bare forward, response logits only"):
        assert any(line.startswith(f"| {label}") for line in rows), label
    assert "nan" not in printed.lower() and "inf" not in printed.lower()
    assert bench_gpu.finite_numbers(results)
    assert results["variants"]["dpo"]["median_s"] > 0 and results["machine"] == "CPU"
    assert results["variants"]["sepo_published"]["selected_positions_only"] is True
    assert results["openrlhf"].startswith("OpenRLHF 0.11.2")
    assert json.loads(out_json.read_text())["variants"].keys() == results["variants"].keys()
    assert out_md.read_text() in printed
    assert sys.modules["openrlhf_sepo.trainer"] is openrlhf_sepo.trainer is trainer_before  # nothing left behind


def test_bench_settings_are_the_entrypoints_defaults():
    from openrlhf_sepo.cli.train_sepo import build_parser as sepo_parser
    from openrlhf_sepo.cli.train_tkpo import build_parser as tkpo_parser
    from openrlhf_sepo.datasets import KeyTokens

    sepo, tkpo = sepo_parser(), tkpo_parser()
    assert sepo.get_default("model.nll_loss_coef") == bench_gpu.SEPO_NLL_COEF
    assert sepo.get_default("sepo.k_chosen") == sepo.get_default("sepo.k_rejected") == bench_gpu.SEPO_K
    assert sepo.get_default("sepo.beta") == bench_gpu.SEPO_BETA
    assert (tkpo.get_default("tkpo.num_negatives"), tkpo.get_default("tkpo.tau"), tkpo.get_default("tkpo.lam")) == (
        bench_gpu.TKPO_NEGATIVES, bench_gpu.TKPO_TAU, bench_gpu.TKPO_LAM)
    assert bench_gpu.KeyTokens._fields == KeyTokens._fields
    p = bench_gpu.SIZES["1b"]  # TinyLlama-1.1B's shape
    per_layer = 2 * p["hidden"] ** 2 + 2 * p["hidden"] * p["hidden"] // p["heads"] * p["kv_heads"]
    per_layer += 3 * p["hidden"] * p["intermediate"] + 2 * p["hidden"]
    total = p["layers"] * per_layer + 2 * p["vocab"] * p["hidden"] + p["hidden"]
    assert 1.09e9 < total < 1.11e9


def test_cost_table_formulas_and_break_even():
    opts = cost_table.parse_args(["--policy", "8e9", "--oracle", "1e9", "--pairs", "1000", "--tokens_per_seq", "100",
                                  "--share", "0.5"])
    rows = dict(cost_table.pipeline(opts, *cost_table.unit_costs()))
    n, tokens = 8e9, 1000 * 100
    assert rows["DPO"]["policy"] == 2 * tokens * (6 * n + 2 * n)  # policy train + reference forward, 2 sides
    assert rows["SimPO"]["policy"] == 2 * tokens * 6 * n
    assert rows["TKPO (one SFT row per pair)"]["policy"] == tokens * 8 * n
    sepo = rows["SePO, oracle the paper's 1.00B"]
    assert sepo == {"small SFT": tokens * 6e9, "oracle / RM": 0.5 * 2 * tokens * 8e9, "scoring": 2 * tokens * 4e9,
                    "policy": 2 * tokens * 6 * n}
    even = cost_table.break_even_share(opts, *cost_table.unit_costs())
    share = even["SePO, oracle the paper's 1.00B"]  # 128 n = 6 + 16 s + 8 + 96 (in 10^9 x tokens): s = 1.125
    assert math.isclose(share, (128 - 6 - 8 - 96) / 16)
    bench = {"variants": {"dpo": {"min_s": 2.0, "median_s": 2.0}, "sepo_default": {"min_s": 1.0, "median_s": 1.5}},
             "scoring": {"token_scores": {"median_s": 1.2}, "bare_forward": {"median_s": 1.0}}}
    ratios = cost_table.bench_ratios(bench)
    assert ratios == {"dpo": 1.0, "sepo_default": 0.5, "scoring": 1.2}
    measured = dict(cost_table.pipeline(opts, *cost_table.unit_costs(), ratios))
    assert measured["SePO, oracle the paper's 1.00B"]["policy"] == 0.5 * rows["DPO"]["policy"]
    assert math.isclose(measured["SePO, oracle the paper's 1.00B"]["scoring"], 1.2 * sepo["scoring"])


def test_cost_table_measures_and_prints(tmp_path, capsys):
    result = cost_table.main(["--measure", "--tiny", "--per_token_out", str(tmp_path / "pt.json"),
                              "--markdown", str(tmp_path / "t.md")])
    printed = capsys.readouterr().out
    per_token = json.loads((tmp_path / "pt.json").read_text())
    assert len(per_token["points"]) == 2 and all(p["forward_s_per_token"] > 0 for p in per_token["points"])
    assert "## FLOP model" in printed and "## Measured" in printed and "| DPO |" in printed
    assert set(result["measured"]) == set(result["flop_model"])


def test_docs_cost_tables_are_the_scripts_output():
    """docs/cost.md's FLOP-model tables are cost_table.py's output at its defaults, and its measured table is the
    output for the committed per-token and bench JSON."""
    doc = open(os.path.join(os.path.dirname(BENCH), "docs", "cost.md")).read()
    opts = cost_table.parse_args([])
    flop = cost_table.table(opts, *cost_table.unit_costs(), flops=True)
    assert flop.split("\n\n")[0] in doc
    bullets = [line for line in flop.splitlines() if line.startswith("- ")]
    assert len(bullets) == 5 and all(line in doc for line in bullets)
    assert cost_table.sweep(opts, *cost_table.unit_costs()) in doc
    with open(os.path.join(BENCH, "results", "per_token_cpu.json")) as f:
        per_token = json.load(f)
    with open(os.path.join(BENCH, "results", "bench_cpu_small.json")) as f:
        ratios = cost_table.bench_ratios(json.load(f))
    assert cost_table.table(opts, *cost_table.unit_costs(per_token), ratios).split("\n\n")[0] in doc

"""benchmarks/bench_scoring.py at tiny size on the CPU, in-process: every row printed, finite positive times, one
side-by-side ratio per repeat against each floor (no timing is asserted: speed is the benchmark's to report)."""

import importlib.util
import math
import os

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_scoring.py")


def test_tiny_run_prints_every_row_and_a_ratio_per_repeat(capsys):
    spec = importlib.util.spec_from_file_location("bench_scoring", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--pairs", "8", "--vocab", "512", "--hidden", "32", "--layers", "1", "--repeats", "2",
                          "--loop_pairs", "2", "--micro_batch_size", "4"])
    printed = capsys.readouterr().out
    for label in ("score_tokens (CLI scoring phase)", "bare forward, full logits (floor)",
                  "bare forward, response logits only", "the same, and their log-softmax",
                  "time vs bare forward with response logits only", "time vs the normalized floor"):
        assert label in printed, label
    assert results["tokens"] > 0
    times = [v for k, v in results.items() if k.endswith("_s")]
    assert len(times) == 6 and all(math.isfinite(t) and t > 0 for t in times)
    assert len(results["ratios"]) == len(results["ratios_normalized"]) == 2
    assert all(math.isfinite(r) and r > 0 for r in results["ratios"] + results["ratios_normalized"])
    assert "nan" not in printed.lower()

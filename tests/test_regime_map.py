"""The regime map (``openrlhf_sepo.bench.regime_map``, ``python -m openrlhf_sepo.cli.regime_map``): the grid and its
flags, the aggregation and heatmaps from synthetic per-cell metrics.json files, the resume rule (with a stub of the
harness call only), and one reduced map end to end (slow)."""

import json
import math
import os
import random
import subprocess
import sys

import pytest

from openrlhf_sepo import testbed
from openrlhf_sepo.bench import regime_map
from openrlhf_sepo.bench.keywords import TESTBED_SIZES
from openrlhf_sepo.bench.stats import paired_ci95
from openrlhf_sepo.cli import regime_map as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = {"density": [0.03, 0.08], "flaw_rate": [0.0, 0.5], "label_noise": [0.0], "cue": [0.0, 0.3]}
METHODS = ["sepo", "dpo_nll", "sepo_random", "sepo_truth", "wmle", "sft_chosen", "sepo_token_rm"]  # no confidence
SETTINGS = {m: {"lr": 0.003, "beta": 1.0} for m in METHODS}
SEEDS = [0, 1, 2, 3, 4]


def _settings_file(tmp_path, methods=METHODS):
    """A settings file in the committed format (``{"settings": {method: {"lr", "beta"}}}``), the demo's values."""
    with open(os.path.join(REPO, "openrlhf_sepo", "bench", "demo_settings.json")) as f:
        demo = json.load(f)["settings"]
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"settings": {m: demo[m] for m in methods}}))
    return str(path)


def _write_metrics(cell_dir, task, per_seed, seeds=SEEDS, settings=SETTINGS, quick=False, wall=None):
    """A synthetic cell: the metrics.json keys the map reads (as keywords_report writes them), and optionally the
    map's own wall-time record."""
    os.makedirs(cell_dir, exist_ok=True)
    metrics = {"per_seed": {"ground_truth_reward": per_seed}, "seeds": seeds, "settings": settings,
               "key_token_base_rate": 0.01 + task.density, "task": {
                   "variant": "testbed", **TESTBED_SIZES["quick" if quick else "full"], **task.as_dict(),
                   "mean_response_tokens": 60.0 + 10 * task.density}}
    with open(os.path.join(cell_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    if wall is not None:
        with open(os.path.join(cell_dir, regime_map.RECORD), "w") as f:
            json.dump({"runs": [{"wall_time_s": wall, "finished": True}]}, f)


def _per_seed(rng, shift):
    """Per-seed ground truth of METHODS; sepo is dpo_nll + ``shift`` + small noise, the rest noise."""
    base = [rng.uniform(-0.5, 0.5) for _ in SEEDS]
    values = {m: [b + rng.gauss(0, 0.3) for b in base] for m in METHODS}
    values["sepo"] = [v + shift + rng.gauss(0, 0.01) for v in values["dpo_nll"]]
    return values


def _run_info(tmp_path, grid=GRID, methods=METHODS):
    return dict(grid=grid, seeds=SEEDS, methods=methods, settings_file=_settings_file(tmp_path),
                settings=SETTINGS, quick=False)


# --- the grid and its flags ---------------------------------------------------------------------------------------
def test_the_default_grid_is_24_cells_with_every_other_knob_at_its_default():
    cells = regime_map.grid_cells(regime_map.DEFAULT_GRID)
    assert len(cells) == 24 and len({regime_map.cell_name(t) for t in cells}) == 24
    default = testbed.Task()
    for task in cells:
        assert (task.length, task.context, task.flaws) == (default.length, default.context, default.flaws)
    assert {(t.density, t.flaw_rate, t.label_noise, t.cue) for t in cells} == {
        (d, f, n, c) for d in (0.03, 0.08, 0.2) for f in (0, 0.5) for n in (0, 0.2) for c in (0, 0.3)}
    assert regime_map.cell_name(testbed.Task(density=0.08, flaw_rate=0.5, label_noise=0.2, cue=0.0)) == \
        "density0.08_flaw0.5_noise0.2_cue0"
    args = cli.build_parser().parse_args(["--densities", "0.05,0.1", "--cues", "0"])
    assert args.densities == [0.05, 0.1] and args.cues == [0.0] and args.flaw_rates == [0.0, 0.5]
    assert args.seeds == "0,1,2,3,4" and args.output_dir == "regime_map"


@pytest.mark.parametrize("flag, value, words", [
    ("--densities", "0.08,0.7", "density must be in (0, 0.5]"),
    ("--flaw_rates", "1.5", "flaw_rate must be in [0, 1]"),
    ("--label_noises", "0,0.5", "label_noise must be in [0, 0.5)"),
    ("--cues", "-0.1", "cue must be in [0, 1]"),
    ("--densities", "0.08,0.08", "given twice"),
])
def test_a_bad_grid_value_is_refused_naming_its_flag(tmp_path, flag, value, words):
    with pytest.raises(SystemExit) as refused:
        cli.main(["--output_dir", str(tmp_path / "map"), "--settings", _settings_file(tmp_path), flag, value])
    assert str(refused.value.code).startswith(flag + ":") and words in str(refused.value.code)
    assert not os.path.exists(tmp_path / "map")  # refused before anything is written


def test_a_value_that_is_no_number_is_refused_by_the_parser_naming_its_flag(capsys):
    with pytest.raises(SystemExit) as refused:
        cli.build_parser().parse_args(["--flaw_rates", "0,half"])
    assert refused.value.code == 2 and "argument --flaw_rates" in capsys.readouterr().err


def test_the_default_methods_and_a_missing_settings_file_are_checked_up_front(tmp_path):
    assert regime_map.METHODS == ["sepo", "dpo_nll", "sepo_random", "confidence", "sepo_truth", "wmle",
                                  "sft_chosen", "sepo_token_rm"]
    assert [f"{a} - {b}" for a, b in regime_map.mapped_comparisons(regime_map.METHODS)[0]] == [
        "sepo - dpo_nll", "sepo - sepo_random", "sepo - confidence", "sepo_truth - dpo_nll", "wmle - sft_chosen",
        "sepo_token_rm - sepo"]
    with pytest.raises(SystemExit, match="^--settings: cannot read"):
        cli.main(["--output_dir", str(tmp_path / "map"), "--settings", str(tmp_path / "absent.json")])
    with pytest.raises(SystemExit, match=r"^--settings .*no setting for \['confidence'\]"):
        cli.main(["--output_dir", str(tmp_path / "map"), "--settings", _settings_file(tmp_path)])
    with pytest.raises(SystemExit, match="^--methods: unknown"):
        cli.main(["--output_dir", str(tmp_path / "map"), "--methods", "sepo,nope"])


# --- the map from synthetic cells ----------------------------------------------------------------------------------
def test_the_map_reads_each_cells_paired_differences_and_draws_them(tmp_path):
    out, rng = tmp_path / "map", random.Random(0)
    cells = regime_map.grid_cells(GRID)
    written = {}
    for i, task in enumerate(cells[:-1]):  # the last cell has not finished
        per_seed = _per_seed(rng, shift=0.4 if i == 0 else 0.0)
        if i == 1:
            del per_seed["sft_chosen"]  # a cell without one method: its comparison is missing there only
        _write_metrics(out / regime_map.cell_name(task), task, per_seed, wall=100.0 + i)
        written[regime_map.cell_name(task)] = per_seed
    doc = regime_map.write_map(str(out), cells, _run_info(tmp_path), 12.0)

    with open(out / "regime_map.json") as f:
        assert json.load(f) == json.loads(json.dumps(doc))
    assert doc["comparisons"] == ["sepo - dpo_nll", "sepo - sepo_random", "sepo_truth - dpo_nll", "wmle - sft_chosen",
                                  "sepo_token_rm - sepo"]
    assert doc["left_out"] == {"sepo - confidence": "not run: confidence"}
    assert doc["cells_not_finished"] == [regime_map.cell_name(cells[-1])]
    assert len(doc["cells"]) == len(cells) - 1 and doc["grid"] == GRID
    assert doc["settings_file"].endswith("settings.json") and doc["settings"] == SETTINGS
    assert doc["wall_time_s"] == {"cells": sum(100.0 + i for i in range(len(cells) - 1)), "this_invocation": 12.0}
    for entry in doc["cells"]:
        per_seed, task = written[entry["name"]], next(t for t in cells if regime_map.cell_name(t) == entry["name"])
        assert entry["knobs"] == {"density": task.density, "flaw_rate": task.flaw_rate,
                                  "label_noise": task.label_noise, "cue": task.cue}
        assert entry["mean_response_tokens"] == 60.0 + 10 * task.density
        assert entry["key_token_base_rate"] == 0.01 + task.density and entry["n_seeds"] == 5
        for a, b in regime_map.COMPARISONS:
            d = entry["differences"].get(f"{a} - {b}")
            if a not in per_seed or b not in per_seed:
                assert d is None
                continue
            mean, hw = paired_ci95(per_seed[a], per_seed[b])
            assert (d["mean"], d["ci95"], d["n_seeds"]) == (pytest.approx(mean), pytest.approx(hw), 5)
            assert d["excludes_zero"] == (abs(mean) > hw)
    first, second = doc["cells"][0]["differences"], doc["cells"][1]["differences"]
    assert first["sepo - dpo_nll"]["excludes_zero"] and first["sepo - dpo_nll"]["mean"] > 0.35
    assert "wmle - sft_chosen" not in second and "wmle - sft_chosen" in first

    for a, b in regime_map.COMPARISONS:
        png = out / regime_map.png_name(a, b)
        assert png.exists() == (b != "confidence"), png
        if png.exists():
            assert png.stat().st_size > 10_000
    md = (out / "regime_map.md").read_text()
    assert "## sepo - dpo_nll" in md and "## sepo - confidence" not in md and "`sepo - confidence` (not run: confidence)" in md
    assert "tuned once and not per cell" in md and "Not finished yet (1 cells)" in md
    star = f"**★ {'+' if first['sepo - dpo_nll']['mean'] > 0 else '-'}{abs(first['sepo - dpo_nll']['mean']):.3f}"
    assert star in md
    assert "| 0 | 0 | 0 | " in md and "density 0.03 | density 0.08 |" in md


# --- the resume rule -----------------------------------------------------------------------------------------------
def _args(out, settings, grid=GRID, seeds="0,1,2,3,4"):
    return ["--output_dir", str(out), "--settings", settings, "--seeds", seeds, "--methods", ",".join(METHODS),
            *[x for knob, flag in regime_map.AXES for x in (f"--{flag}", ",".join(map(str, grid[knob])))]]


def test_a_cell_with_metrics_json_is_not_run_again(tmp_path, monkeypatch, capsys):
    out, settings = tmp_path / "map", _settings_file(tmp_path)
    with open(settings) as f:
        tuned = json.load(f)["settings"]
    cells = regime_map.grid_cells(GRID)
    calls = []

    def stub_of_the_harness_call(task, cell_args):
        """Stands in for ``run_cell`` (the harness): records the call, writes the cell's metrics.json."""
        calls.append(regime_map.cell_name(task))
        assert cell_args.output_dir == str(out / regime_map.cell_name(task)) and not cell_args.sweep
        assert cell_args.seeds == "0,1,2,3,4" and cell_args.methods == ",".join(METHODS)
        assert cell_args.settings == settings and cell_args.quick is False
        _write_metrics(cell_args.output_dir, task, _per_seed(random.Random(len(calls)), 0.0), settings=tuned)

    monkeypatch.setattr(regime_map, "run_cell", stub_of_the_harness_call)
    _write_metrics(out / regime_map.cell_name(cells[2]), cells[2], _per_seed(random.Random(9), 0.0), settings=tuned)
    assert cli.main(_args(out, settings)) == 0
    assert calls == [regime_map.cell_name(t) for i, t in enumerate(cells) if i != 2]
    printed = capsys.readouterr().out
    assert f"cell 3/8 {regime_map.cell_name(cells[2])}: skipped (finished: metrics.json)" in printed
    assert "done in" in printed and "cells run in" in printed
    with open(out / "regime_map.json") as f:
        doc = json.load(f)
    assert len(doc["cells"]) == 8 and doc["cells"][2]["wall_time_s"] is None  # finished elsewhere: no record
    assert all(e["wall_time_s"] is not None for i, e in enumerate(doc["cells"]) if i != 2)

    calls.clear()
    assert cli.main(_args(out, settings)) == 0
    assert calls == [] and capsys.readouterr().out.count("skipped (finished: metrics.json)") == 8

    # A finished cell of another run (other seeds) is not taken for this map's, and nothing runs: a new cell of the
    # grid first, the finished ones after it.
    with pytest.raises(SystemExit, match="a finished run with other seeds"):
        cli.main(_args(out, settings, grid=dict(GRID, density=[0.2, 0.03]), seeds="0,1,2"))
    assert calls == []


def test_results_dir_keeps_each_finished_cell_and_a_fresh_output_dir_resumes_from_it(tmp_path, monkeypatch, capsys):
    results, settings = tmp_path / "docs_results", _settings_file(tmp_path)
    with open(settings) as f:
        tuned = json.load(f)["settings"]
    cells = regime_map.grid_cells(GRID)
    calls, stop_at = [], [3]

    def stub_of_the_harness_call(task, cell_args):
        """Stands in for ``run_cell``: the first run's third call dies (a session stopped), the others write
        metrics.json."""
        calls.append(regime_map.cell_name(task))
        if len(calls) in stop_at:
            raise SystemExit("stopped")
        _write_metrics(cell_args.output_dir, task, _per_seed(random.Random(len(calls)), 0.0), settings=tuned)

    monkeypatch.setattr(regime_map, "run_cell", stub_of_the_harness_call)
    first = tmp_path / "run1"
    with pytest.raises(SystemExit, match="stopped"):
        cli.main(_args(first, settings) + ["--results_dir", str(results)])
    kept = sorted(p.name for p in results.iterdir() if p.is_dir())
    assert kept == sorted(regime_map.cell_name(t) for t in cells[:2])
    for name in kept:  # only the small record files, byte for byte
        assert sorted(os.listdir(results / name)) == sorted(regime_map.RECORD_FILES)
        assert (results / name / "metrics.json").read_bytes() == (first / name / "metrics.json").read_bytes()
    with open(results / "regime_map.json") as f:
        assert [e["name"] for e in json.load(f)["cells"]] == kept

    # A fresh clone: another output dir, the kept cells restored and skipped, the rest run.
    calls.clear()
    stop_at.clear()
    second = tmp_path / "run2"
    assert cli.main(_args(second, settings) + ["--results_dir", str(results)]) == 0
    assert calls == [regime_map.cell_name(t) for t in cells[2:]]
    assert capsys.readouterr().out.count("restored from") == 2
    with open(results / "regime_map.json") as f:
        doc = json.load(f)
    assert len(doc["cells"]) == 8 and doc["cells_not_finished"] == []
    assert all(e["wall_time_s"] is not None for e in doc["cells"])  # the kept cells keep their recorded time
    assert (results / "regime_map.md").exists() and (results / "regime_sepo_minus_dpo_nll.png").exists()

    # A kept cell of another run is refused like any finished cell: nothing runs.
    calls.clear()
    with pytest.raises(SystemExit, match="a finished run with other seeds"):
        cli.main(_args(tmp_path / "run3", settings, seeds="0,1,2") + ["--results_dir", str(results)])
    assert calls == []


def test_a_failed_cell_records_its_time_and_is_run_again(tmp_path, monkeypatch):
    out, settings = tmp_path / "map", _settings_file(tmp_path)
    grid = dict(GRID, density=[0.08], cue=[0.3], flaw_rate=[0.5])

    def stub_of_the_harness_call_that_fails(task, cell_args):
        raise SystemExit("launch stage2 failed")

    monkeypatch.setattr(regime_map, "run_cell", stub_of_the_harness_call_that_fails)
    with pytest.raises(SystemExit, match="stage2 failed"):
        cli.main(_args(out, settings, grid=grid))
    task = regime_map.grid_cells(grid)[0]
    with open(out / regime_map.cell_name(task) / regime_map.RECORD) as f:
        record = json.load(f)
    assert [r["finished"] for r in record["runs"]] == [False]
    assert not (out / regime_map.cell_name(task) / "metrics.json").exists()


# --- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_regime_map_end_to_end_and_rerun_skips_every_cell(tmp_path, run_in_own_group):
    out = str(tmp_path / "map")
    methods = ["sepo", "dpo_nll", "sepo_truth"]
    cmd = [sys.executable, "-m", "openrlhf_sepo.cli.regime_map", "--output_dir", out, "--quick",
           "--densities", "0.08", "--flaw_rates", "0,0.5", "--label_noises", "0", "--cues", "0.3",
           "--seeds", "0,1", "--methods", ",".join(methods), "--settings", _settings_file(tmp_path, methods)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = run_in_own_group(cmd, 2400, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout[-3000:])

    with open(os.path.join(out, "regime_map.json")) as f:
        doc = json.load(f)
    assert doc["comparisons"] == ["sepo - dpo_nll", "sepo_truth - dpo_nll"]
    assert set(doc["left_out"]) == {"sepo - sepo_random", "sepo - confidence", "wmle - sft_chosen",
                                    "sepo_token_rm - sepo"}
    assert [e["name"] for e in doc["cells"]] == ["density0.08_flaw0_noise0_cue0.3", "density0.08_flaw0.5_noise0_cue0.3"]
    assert doc["cells_not_finished"] == [] and doc["quick"] is True
    for entry in doc["cells"]:
        assert entry["n_seeds"] == 2 and entry["wall_time_s"] > 0
        assert math.isfinite(entry["mean_response_tokens"]) and 0 < entry["key_token_base_rate"] < 1
        assert set(entry["differences"]) == set(doc["comparisons"])
        for d in entry["differences"].values():
            assert math.isfinite(d["mean"]) and math.isfinite(d["ci95"]) and d["n_seeds"] == 2
        with open(os.path.join(out, entry["name"], "metrics.json")) as f:
            per_seed = json.load(f)["per_seed"]["ground_truth_reward"]
        assert entry["differences"]["sepo - dpo_nll"]["mean"] == pytest.approx(
            paired_ci95(per_seed["sepo"], per_seed["dpo_nll"])[0])
    for name in ("regime_sepo_minus_dpo_nll.png", "regime_sepo_truth_minus_dpo_nll.png", "regime_map.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, "regime_sepo_minus_confidence.png"))
    for entry in doc["cells"]:  # no curves: no training snapshots, no frontier or curve plot
        cell = os.path.join(out, entry["name"])
        assert not os.path.exists(os.path.join(cell, "frontier.png")) and os.path.exists(os.path.join(cell, "selection.png"))
        for seed in ("seed0", "seed1"):
            ckpt = os.path.join(cell, seed, "ckpt")
            snapshots = [d for run in (os.listdir(ckpt) if os.path.isdir(ckpt) else [])
                         for d in os.listdir(os.path.join(ckpt, run)) if d.startswith("global_step")]
            assert snapshots == []
            with open(os.path.join(cell, seed, "evaluation.json")) as f:
                evaluation = json.load(f)
            assert evaluation["curves"] == {} and set(methods) <= set(evaluation["final"])

    rerun = run_in_own_group(cmd, 600, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("skipped (finished: metrics.json)") == 2 and "[demo]" not in rerun.stdout
    assert "0 of 2 cells run" in rerun.stdout

"""The regime map: where token-level credit pays, over the testbed's knobs (``python -m openrlhf_sepo.cli.regime_map``).

The grid is key-token density x flaw rate x label noise x spurious cue (``AXES``; every other ``testbed.Task`` knob
at its default). Each cell is one harness run (``runner.Benchmark`` of ``keywords.KeywordSpec(task="testbed")``) in
its own subdir ``<output_dir>/<cell name>``, with the map's seeds and methods and the SAME tuned settings in every
cell: by default the default testbed task's (``keywords.TESTBED_SETTINGS_FILE``), tuned once at the grid's centre and
never per cell. Cells run one after another; a cell whose ``metrics.json`` exists is finished and is skipped outright
(a cell killed half-way resumes through the harness's own done markers). The cells train no snapshots and evaluate
the final models only (``KeywordSpec(curves=False)``): the map reads nothing else.

``results_dir`` (docs/results/regime_map in the docs) is the map's durable record, small enough to commit: each
finished cell's ``metrics.json`` and ``RECORD`` under ``<results_dir>/<cell name>``, and the map itself. A run on a
fresh clone restores those cells into ``output_dir`` first (checked against its flags like any finished cell), so a
map that takes longer than one sitting resumes from what was committed.

From each cell's ``metrics.json`` (``per_seed["ground_truth_reward"]``) the map reads the paired differences of
``COMPARISONS`` seed by seed (``stats.paired_differences``) and writes ``regime_map.json``, ``regime_map.md`` (a
table per comparison) and a heatmap per comparison (``regime_<a>_minus_<b>.png``). A comparison whose methods were not
run is left out, and the outputs say so.
"""

import itertools
import json
import math
import os
import shutil
import time
import types

from openrlhf_sepo import testbed
from openrlhf_sepo.bench.keywords import METHODS as KEYWORD_METHODS
from openrlhf_sepo.bench.keywords import TESTBED_SETTINGS_FILE, TESTBED_SIZES, KeywordSpec
from openrlhf_sepo.bench.runner import Benchmark, load_settings
from openrlhf_sepo.bench.stats import excludes_zero, format_ci, paired_differences

# The grid's axes: (testbed.Task knob, its flag), in the order of a cell's name; the default values of each.
AXES = (("density", "densities"), ("flaw_rate", "flaw_rates"), ("label_noise", "label_noises"), ("cue", "cues"))
DEFAULT_GRID = {"density": [0.03, 0.08, 0.2], "flaw_rate": [0.0, 0.5], "label_noise": [0.0, 0.2], "cue": [0.0, 0.3]}
CENTRE = {knob: getattr(testbed.Task(), knob) for knob, _ in AXES}  # where the default settings were tuned
DEFAULT_SEEDS = "0,1,2,3,4"
# The methods the comparisons need (the default --methods).
METHODS = ["sepo", "dpo_nll", "sepo_random", "confidence", "sepo_truth", "wmle", "sft_chosen", "sepo_token_rm"]
# (a, b) -> a - b in ground-truth reward, seed by seed, per cell:
COMPARISONS = [
    ("sepo", "dpo_nll"),  # selective credit against the sequence-level loss, both with the NLL term
    ("sepo", "sepo_random"),  # does the oracle's choice of tokens matter, or only that fewer are trained?
    ("sepo", "confidence"),  # the oracle's selection against the policy's own (no oracle)
    ("sepo_truth", "dpo_nll"),  # perfect token credit against the sequence-level loss: the ceiling of selection
    ("wmle", "sft_chosen"),  # what the learned token weights add to imitating the chosen answers
    ("sepo_token_rm", "sepo"),  # the learned token RM against the DPO oracle as SePO's scorer
]
RECORD = "regime_cell.json"  # per cell: the wall seconds of each invocation that ran it
TAG = "[regime_map]"


def cell_name(task) -> str:
    """``density0.08_flaw0.5_noise0.2_cue0.3``: the cell's subdir."""
    return f"density{task.density:g}_flaw{task.flaw_rate:g}_noise{task.label_noise:g}_cue{task.cue:g}"


def grid_cells(grid: dict) -> list:
    """[testbed.Task] of every cell of ``grid`` ({knob of AXES: [values]}), the other knobs at their defaults.
    ValueError naming the flag for an empty axis, a repeated value or one the task refuses."""
    for knob, flag in AXES:
        values = grid[knob]
        if not values:
            raise ValueError(f"--{flag}: give at least one value")
        if len(set(values)) < len(values):
            raise ValueError(f"--{flag}: a value is given twice: {values}")
        for value in values:
            try:
                testbed.Task(**{knob: value})
            except ValueError as e:  # "testbed task: density must be in (0, 0.5], got 0.7"
                raise ValueError(f"--{flag}: {e}") from None
    knobs = [knob for knob, _ in AXES]
    return [testbed.Task(**dict(zip(knobs, values))) for values in itertools.product(*(grid[k] for k in knobs))]


def mapped_comparisons(methods) -> tuple:
    """(the comparisons of COMPARISONS whose two methods are in ``methods``, {"a - b": why left out} of the rest)."""
    kept, left_out = [], {}
    for a, b in COMPARISONS:
        missing = [m for m in (a, b) if m not in methods]
        if missing:
            left_out[f"{a} - {b}"] = f"not run: {', '.join(missing)}"
        else:
            kept.append((a, b))
    return kept, left_out


# --- running the cells ----------------------------------------------------------------------------------
def run(args) -> dict:
    """The regime map for parsed ``cli.regime_map`` flags: every cell not finished yet, one after another, then the
    map (also rewritten after each cell, so a long run shows its progress). Returns the map document."""
    grid = {knob: list(getattr(args, flag)) for knob, flag in AXES}
    try:
        cells = grid_cells(grid)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in KEYWORD_METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(KEYWORD_METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: comma-separated integers expected, got {args.seeds!r}") from None
    if len(seeds) < 2:
        raise SystemExit("--seeds: give at least 2 seeds (5 or more for a map worth reading)")
    settings_file = os.path.abspath(args.settings or TESTBED_SETTINGS_FILE)
    tuned = load_settings(settings_file, methods)
    settings = {m: tuned[m] for m in methods}
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    run_info = dict(grid=grid, seeds=seeds, methods=methods, settings_file=settings_file, settings=settings,
                    quick=bool(args.quick))
    _, left_out = mapped_comparisons(methods)
    for name, why in left_out.items():
        print(f"{TAG} {name}: left out of the map ({why})", flush=True)

    results = os.path.abspath(args.results_dir) if args.results_dir else None
    if results:
        for task in cells:
            restore(results, out, cell_name(task))
    # Every finished cell is checked against these flags before any cell runs.
    done = [finished(os.path.join(out, cell_name(t)), t, seeds, methods, settings, args.quick) for t in cells]
    start, ran = time.time(), 0
    for i, (task, is_done) in enumerate(zip(cells, done), 1):
        name = cell_name(task)
        cell_dir = os.path.join(out, name)
        if is_done:
            print(f"{TAG} cell {i}/{len(cells)} {name}: skipped (finished: metrics.json)", flush=True)
            continue
        print(f"{TAG} cell {i}/{len(cells)} {name} ...", flush=True)
        seconds = timed_cell(cell_dir, task, types.SimpleNamespace(
            output_dir=cell_dir, quick=args.quick, sweep=False, seeds=",".join(map(str, seeds)),
            methods=",".join(methods), settings=settings_file, nproc=args.nproc))
        ran += 1
        print(f"{TAG} cell {i}/{len(cells)} {name}: done in {seconds:.0f} s "
              f"({time.time() - start:.0f} s since the start)", flush=True)
        for where in (out, *([keep(cell_dir, results, name)] if results else [])):
            write_map(where, cells, run_info, time.time() - start)
    elapsed = time.time() - start
    doc = write_map(out, cells, run_info, elapsed)
    if results:
        write_map(results, cells, run_info, elapsed)
    print(f"{TAG} {ran} of {len(cells)} cells run in {elapsed:.0f} s; the cells' recorded wall time in all "
          f"{doc['wall_time_s']['cells']:.0f} s. Map: {os.path.join(out, 'regime_map.md')}", flush=True)
    return doc


def run_cell(task, cell_args) -> dict:
    """THE harness call: one cell, the benchmark of the testbed task ``task`` (``cell_args``: the harness's flags,
    its output dir the cell's), without curves. Returns its metrics document."""
    return Benchmark(KeywordSpec(task="testbed", testbed_task=task, curves=False), cell_args).run()


RECORD_FILES = ("metrics.json", RECORD)  # what results_dir keeps of a finished cell


def keep(cell_dir, results, name) -> str:
    """Copy the finished cell's RECORD_FILES from ``cell_dir`` to ``<results>/<name>``; returns ``results``."""
    os.makedirs(os.path.join(results, name), exist_ok=True)
    for f in RECORD_FILES:
        shutil.copy2(os.path.join(cell_dir, f), os.path.join(results, name, f))
    return results


def restore(results, out, name) -> bool:
    """Copy a cell kept in ``<results>/<name>`` into ``<out>/<name>`` unless ``out`` holds a finished one already;
    whether it copied."""
    kept, cell_dir = os.path.join(results, name), os.path.join(out, name)
    if not os.path.exists(os.path.join(kept, "metrics.json")) or os.path.exists(os.path.join(cell_dir, "metrics.json")):
        return False
    os.makedirs(cell_dir, exist_ok=True)
    for f in RECORD_FILES:
        if os.path.exists(os.path.join(kept, f)):
            shutil.copy2(os.path.join(kept, f), os.path.join(cell_dir, f))
    print(f"{TAG} {name}: restored from {results}", flush=True)
    return True


def timed_cell(cell_dir, task, cell_args) -> float:
    """``run_cell``, its wall seconds appended to the cell's RECORD (also when it fails: a resumed cell's time is
    the sum of its invocations'). Returns the seconds of this invocation."""
    start = time.time()
    ok = False
    try:
        run_cell(task, cell_args)
        ok = True
    finally:
        seconds = round(time.time() - start, 1)
        record = _read_json(os.path.join(cell_dir, RECORD)) or {"runs": []}
        record["runs"].append({"wall_time_s": seconds, "finished": ok,
                               "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
        os.makedirs(cell_dir, exist_ok=True)
        with open(os.path.join(cell_dir, RECORD), "w") as f:
            json.dump(record, f, indent=1)
    return seconds


def finished(cell_dir, task, seeds, methods, settings, quick) -> bool:
    """Whether the cell is finished: its metrics.json exists (the harness writes it once every seed is evaluated).
    SystemExit when that run had other seeds, methods, settings, knobs or sizes than this map asks for."""
    metrics = _read_json(os.path.join(cell_dir, "metrics.json"))
    if metrics is None:
        return False
    size = TESTBED_SIZES["quick" if quick else "full"]
    ran = dict(seeds=metrics.get("seeds"), methods=sorted(metrics.get("settings", {})), settings=metrics.get("settings"),
               task={k: metrics["task"].get(k) for k in task.as_dict()},
               sizes={k: metrics["task"].get(k) for k in size})
    wanted = dict(seeds=seeds, methods=sorted(methods), settings=settings, task=task.as_dict(), sizes=size)
    differ = [key for key in wanted if ran[key] != wanted[key]]
    if differ:
        raise SystemExit(f"{cell_dir}: a finished run with other {', '.join(differ)} than this map's (--quick and the "
                         f"harness's done markers record none of them): rerun with its flags, or use another "
                         f"--output_dir")
    return True


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# --- the map --------------------------------------------------------------------------------------------
def cell_entry(cell_dir, task, comparisons) -> dict:
    """One cell of the map from its metrics.json (None when it is not finished): its knobs, response length,
    key-token base rate, wall time, and per comparison the paired difference in ground truth (mean, 95%
    half-width, whether that interval excludes 0, seeds)."""
    metrics = _read_json(os.path.join(cell_dir, "metrics.json"))
    if metrics is None:
        return None
    per_seed = metrics["per_seed"]["ground_truth_reward"]
    differences = {name: {"mean": d["mean"], "ci95": _finite(d["ci95"]),
                          "excludes_zero": excludes_zero(d["mean"], d["ci95"]),
                          "n_seeds": len(per_seed[name.split(" - ")[0]])}
                   for name, d in paired_differences(per_seed, comparisons).items()}
    record = _read_json(os.path.join(cell_dir, RECORD))
    return {"name": cell_name(task), "knobs": {knob: getattr(task, knob) for knob, _ in AXES}, "task": task.as_dict(),
            "mean_response_tokens": metrics["task"]["mean_response_tokens"],
            "key_token_base_rate": metrics["key_token_base_rate"], "n_seeds": len(metrics["seeds"]),
            "wall_time_s": round(sum(r["wall_time_s"] for r in record["runs"]), 1) if record else None,
            "differences": differences}


def write_map(out, cells, run_info, elapsed_s) -> dict:
    """regime_map.json, regime_map.md and a heatmap per mapped comparison, from the finished cells among ``cells``
    under ``out``; ``run_info``: grid, seeds, methods, settings_file, settings, quick. Returns the document."""
    comparisons, left_out = mapped_comparisons(run_info["methods"])
    entries = [cell_entry(os.path.join(out, cell_name(task)), task, comparisons) for task in cells]
    done = [e for e in entries if e is not None]
    recorded = [e["wall_time_s"] for e in done if e["wall_time_s"] is not None]
    doc = {**run_info, "centre": CENTRE,
           "fixed_knobs": {k: v for k, v in testbed.Task().as_dict().items() if k not in dict(AXES) and k != "n_keys"},
           "comparisons": [f"{a} - {b}" for a, b in comparisons], "left_out": left_out,
           "cells": done, "cells_not_finished": [cell_name(t) for t, e in zip(cells, entries) if e is None],
           "wall_time_s": {"cells": round(sum(recorded), 1), "this_invocation": round(elapsed_s, 1)}}
    with open(os.path.join(out, "regime_map.json"), "w") as f:
        json.dump(doc, f, indent=1)
    for a, b in comparisons:
        heatmap(os.path.join(out, png_name(a, b)), f"{a} - {b}", run_info["grid"], done, len(run_info["seeds"]))
    with open(os.path.join(out, "regime_map.md"), "w") as f:
        f.write(markdown(doc))
    return doc


def png_name(a, b) -> str:
    return f"regime_{a}_minus_{b}.png"


def _finite(x):
    """``x``, or None for NaN (JSON has no NaN)."""
    return x if x is not None and math.isfinite(x) else None


def _panel_values(entries, name, noise, cue):
    """{(flaw rate, density): the cell's difference ``name``} of the panel (label noise ``noise``, cue ``cue``)."""
    return {(e["knobs"]["flaw_rate"], e["knobs"]["density"]): e["differences"][name] for e in entries
            if e["knobs"]["label_noise"] == noise and e["knobs"]["cue"] == cue and name in e["differences"]}


def heatmap(path, name, grid, entries, n_seeds):
    """A panel per (label noise, cue): density across, flaw rate up; each cell coloured by the mean difference
    (diverging, centred at 0, one symmetric range for every panel) and annotated "mean ± half-width"; bold, a star
    and a heavy border where the 95% interval excludes 0; grey where the cell has not finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    densities, flaws = grid["density"], grid["flaw_rate"]
    means = [d["mean"] for e in entries for n, d in e["differences"].items() if n == name]
    limit = max([abs(m) for m in means] + [1e-3])
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")
    nrows, ncols = len(grid["label_noise"]), len(grid["cue"])
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(max(6.5, 1.5 * len(densities) * ncols + 2.0), 1.1 * len(flaws) * nrows + 1.8))
    for (r, noise), (c, cue) in itertools.product(enumerate(grid["label_noise"]), enumerate(grid["cue"])):
        ax, values = axes[r][c], _panel_values(entries, name, noise, cue)
        image = np.full((len(flaws), len(densities)), np.nan)
        for (flaw, density), d in values.items():
            image[flaws.index(flaw), densities.index(density)] = d["mean"]
        shown = ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit, origin="lower", aspect="auto")
        for (y, flaw), (x, density) in itertools.product(enumerate(flaws), enumerate(densities)):
            d = values.get((flaw, density))
            if d is None:
                ax.text(x, y, "not run", ha="center", va="center", fontsize=8, color="#555555")
                continue
            hw = float("nan") if d["ci95"] is None else d["ci95"]
            text = format_ci(d["mean"], hw, signed=True).replace(" ± ", "\n± ")
            dark = abs(d["mean"]) > 0.6 * limit
            if d["excludes_zero"]:
                text = "★ " + text
                ax.add_patch(Rectangle((x - 0.47, y - 0.47), 0.94, 0.94, fill=False, edgecolor="black", linewidth=2.5))
            ax.text(x, y, text, ha="center", va="center", fontsize=8, color="white" if dark else "black",
                    fontweight="bold" if d["excludes_zero"] else "normal")
        ax.set_xticks(range(len(densities)), [f"{v:g}" for v in densities])
        ax.set_yticks(range(len(flaws)), [f"{v:g}" for v in flaws])
        ax.set_xlabel("key-token density", fontsize=9)
        ax.set_ylabel("flaw rate", fontsize=9)
        ax.set_title(f"label noise {noise:g}, cue {cue:g}", fontsize=10)
    fig.colorbar(shown, ax=axes, shrink=0.8, label=f"{name} (ground-truth reward)")
    fig.suptitle(f"{name}: paired difference in ground-truth reward, seed by seed\n"
                 f"mean ± 95% half-width over {n_seeds} seeds; ★ bold, boxed: the interval excludes 0", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(doc) -> str:
    """regime_map.md: what ran, a table per mapped comparison (a row per label noise, cue and flaw rate, a column per
    density), the left-out comparisons, and the cells (length, base rate, wall time)."""
    grid, centre = doc["grid"], doc["centre"]
    cells = {tuple(e["knobs"][k] for k, _ in AXES): e for e in doc["cells"]}
    fixed = ", ".join(f"{k} {v}" for k, v in doc["fixed_knobs"].items())
    n_cells = math.prod(len(v) for v in grid.values())
    lines = [
        "# The regime map", "",
        f"{n_cells} cells of the testbed: density {grid['density']} x flaw rate {grid['flaw_rate']} x label noise "
        f"{grid['label_noise']} x spurious cue {grid['cue']}, every other knob at its default ({fixed}); "
        f"{'`--quick` sizes; ' if doc['quick'] else ''}seeds {doc['seeds']}; methods {', '.join(doc['methods'])}.",
        f"Settings: `{os.path.basename(doc['settings_file'])}`, the same in every cell, tuned once and not per cell "
        f"(the default file: at the default testbed task, the grid's centre: "
        f"{', '.join(f'{k.replace(chr(95), chr(32))} {v:g}' for k, v in centre.items())}).",
        "Each entry: the paired difference in ground-truth reward on the test prompts, seed by seed, mean ± 95% "
        "half-width (Student t); **bold ★**: the interval excludes 0.", ""]
    if doc["left_out"]:
        lines += ["Left out (methods not run): " + "; ".join(f"`{n}` ({why})" for n, why in doc["left_out"].items())
                  + ".", ""]
    if doc["cells_not_finished"]:
        lines += [f"Not finished yet ({len(doc['cells_not_finished'])} cells): "
                  + ", ".join(doc["cells_not_finished"]) + ".", ""]
    for name in doc["comparisons"]:
        a, b = name.split(" - ")
        lines += [f"## {name}", "", f"![{name}]({png_name(a, b)})", "",
                  "| label noise | cue | flaw rate | " + " | ".join(f"density {d:g}" for d in grid["density"]) + " |",
                  "|---|---|---|" + "---|" * len(grid["density"])]
        for noise, cue, flaw in itertools.product(grid["label_noise"], grid["cue"], grid["flaw_rate"]):
            row = []
            for density in grid["density"]:
                d = cells.get((density, flaw, noise, cue), {}).get("differences", {}).get(name)
                if d is None:
                    row.append("-")
                    continue
                text = format_ci(d["mean"], float("nan") if d["ci95"] is None else d["ci95"], signed=True)
                row.append(f"**★ {text}**" if d["excludes_zero"] else text)
            lines.append(f"| {noise:g} | {cue:g} | {flaw:g} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## The cells", "",
              "| cell | mean response tokens | key-token base rate | seeds | wall time (s) |", "|---|---|---|---|---|"]
    for e in doc["cells"]:
        wall = "-" if e["wall_time_s"] is None else f"{e['wall_time_s']:.0f}"
        lines.append(f"| {e['name']} | {e['mean_response_tokens']:.1f} | {e['key_token_base_rate']:.3f} | "
                     f"{e['n_seeds']} | {wall} |")
    if any(e["wall_time_s"] is not None for e in doc["cells"]):
        lines += ["", f"Wall time of the finished cells in all: {doc['wall_time_s']['cells']:.0f} s (each cell's: the "
                  "sum of the invocations that ran it; a cell finished outside this map has none recorded)."]
    return "\n".join(lines) + "\n"

"""The demo report's plots (``bench.keywords_report``): intervals clipped to each metric's natural range, one fixed
(colour, marker) per method, and the three figures rendered from a small synthetic run, every interval drawn on
them inside its metric's bounds. In-process, no benchmark: the run is made-up evaluations and metrics."""

import math
import os
import types

import pytest

from openrlhf_sepo.bench import keywords
from openrlhf_sepo.bench import keywords_report as kr
from openrlhf_sepo.bench.stats import mean_ci95

NEW_METHODS = ("confidence", "wmle_truth", "sepo_nll_skip", "sepo_truth_nll_skip")  # being added to METHODS
ALL_METHODS = sorted({*keywords.METHODS, *NEW_METHODS})


# --- clipping --------------------------------------------------------------------------------------------------------
def test_every_plotted_metric_has_bounds():
    assert set(kr.METRICS) <= set(kr.BOUNDS)
    assert {"selection_precision", "selection_recall"} <= set(kr.BOUNDS)
    assert kr.BOUNDS["kl_to_sft"] == (0.0, math.inf)
    assert kr.BOUNDS["ground_truth_reward"] == (-1.0, 1.0)
    for metric in ("format_validity", "win_rate_vs_sft", "pairwise_accuracy", "selection_precision"):
        assert kr.BOUNDS[metric] == (0.0, 1.0)


@pytest.mark.parametrize("metric, mean, half_width, expected", [
    ("ground_truth_reward", 0.2, 0.3, (-0.1, 0.5)),  # inside: unchanged
    ("ground_truth_reward", 0.9, 0.3, (0.6, 1.0)),  # clipped above
    ("ground_truth_reward", -0.8, 0.5, (-1.0, -0.3)),  # clipped below
    ("ground_truth_reward", 0.0, 5.0, (-1.0, 1.0)),  # both
    ("kl_to_sft", 2.0, 3.0, (0.0, 5.0)),  # KL: no upper bound
    ("kl_to_sft", 40.0, 30.0, (10.0, 70.0)),
    ("format_validity", 0.95, 0.2, (0.75, 1.0)),
    ("win_rate_vs_sft", 0.05, 0.1, (0.0, 0.15)),
    ("selection_recall", 0.5, float("nan"), (0.5, 0.5)),  # one seed: no interval
    ("kl_to_sft", -0.3, 0.1, (0.0, 0.0)),  # a (sampled) KL estimate below 0: the interval stays inside
])
def test_clip_interval(metric, mean, half_width, expected):
    assert kr.clip_interval(metric, mean, half_width) == pytest.approx(expected)


def test_error_lengths_never_leave_the_bounds():
    below, above = kr._errors("ground_truth_reward", [0.9, -0.95, 0.0], [0.3, 0.2, 0.1])
    assert below == pytest.approx([0.3, 0.05, 0.1]) and above == pytest.approx([0.1, 0.2, 0.1])
    below, above = kr._errors("kl_to_sft", [-0.3, 1.0], [0.1, 4.0])
    assert below == pytest.approx([0.0, 1.0]) and above == pytest.approx([0.0, 4.0])  # a mean outside: no bar


# --- styles ----------------------------------------------------------------------------------------------------------
def test_every_method_has_its_own_colour_and_marker():
    pairs = {m: (kr._style(m)["color"], kr._style(m)["marker"]) for m in ALL_METHODS}
    assert len(set(pairs.values())) == len(pairs), pairs
    assert set(ALL_METHODS) <= set(kr.STYLES)  # listed, not fallbacks: fixed whatever subset runs
    for m in ALL_METHODS:
        assert kr._style(m)["linestyle"] == ("--" if kr._family(m) == "controls" else "-"), m


def test_colours_differ_within_each_panel():
    weak = [m for m in ALL_METHODS if not m.startswith("w2s_")]
    strong = [m for m in ALL_METHODS if m.startswith("w2s_")]
    panels = kr._panels(weak, strong)
    assert [p[0] for p in panels] == [f"weak policy: {kr.FAMILIES[k]}" for k in
                                      ("selective", "sequence", "token_rm", "controls", "ppo")] + [
        "strong policy (hidden 128), weak oracle"]
    assert sorted(m for p in panels for m in p[2]) == sorted(ALL_METHODS)  # each method in exactly one panel
    for title, sft, members, refs in panels:
        colours = [kr._style(m)["color"] for m in members + refs]
        assert len(set(colours)) == len(colours), title


def test_families():
    assert kr._family("sepo_truth_nll_skip") == kr._family("wmle_truth") == kr._family("sepo_random") == "controls"
    assert kr._family("confidence") == kr._family("sepo_nll_skip") == "selective"
    assert kr._family("sepo_token_rm") == kr._family("wmle_onpolicy") == "token_rm"
    assert kr._family("sft_chosen") == kr._family("dpo") == "sequence"
    assert kr._family("w2s_x_sepo") == "weak_to_strong" and kr._family("tkpo") == "other"
    assert kr._family("ppo") == kr._family("ppo_dense") == kr._family("ppo_dense_token_rm") == "ppo"


def test_an_unlisted_method_gets_a_fixed_pair_no_listed_method_has():
    style = kr._style("some_new_method")
    assert style == kr._style("some_new_method")  # from the name alone
    assert (style["color"], style["marker"]) not in set(kr.STYLES.values())
    assert style["marker"] != "*"  # the SFT model's


# --- rendering -------------------------------------------------------------------------------------------------------
SEEDS = [0, 1, 2]
STEPS = ["0", "8", "16"]


def _run(weak, strong):
    """Made-up evaluations (the shape of ``Benchmark.evaluations()``) and the metrics the plots read, whose seed
    values spread enough that an unclipped 95% interval would leave every metric's bounds."""
    def values(metric, i):
        lo, hi = {"kl_to_sft": (0.05, 8.0), "ground_truth_reward": (-0.9, 1.0)}.get(metric, (0.0, 1.0))
        return [hi, lo + 0.1 * (hi - lo), hi] if i % 2 else [lo, lo, hi]  # near one bound or the other

    models = ["sft", "oracle", *weak, "strong_sft", *strong]
    selective = [m for m in weak + strong if "sepo" in m]
    evaluations = {
        s: {"final": {m: {metric: values(metric, i)[n] for metric in kr.METRICS} for i, m in enumerate(models)},
            "curves": {m: {st: {metric: values(metric, i + j)[n] for metric in kr.METRICS}
                           for j, st in enumerate(STEPS)} for i, m in enumerate(weak + strong)}}
        for n, s in enumerate(SEEDS)}
    for s in SEEDS:  # the final model is the last snapshot
        for m in weak + strong:
            evaluations[s]["curves"][m][STEPS[-1]] = evaluations[s]["final"][m]
    metrics, ci95 = {}, {}
    for metric in ("kl_to_sft", "ground_truth_reward", "selection_precision", "selection_recall"):
        names = selective if metric.startswith("selection") else models
        stats = {m: mean_ci95(values(metric, i)) for i, m in enumerate(names)}
        metrics[metric] = {m: v[0] for m, v in stats.items()}
        ci95[metric] = {m: v[1] for m, v in stats.items()}
    scorers = {scorer: {side: {k: list(mean_ci95(values("selection_" + side, i))) for k in ("0.1", "0.3")}
                        for side in ("precision", "recall")} for i, scorer in enumerate(("oracle", "token_rm"))}
    return evaluations, dict(metrics, ci95=ci95, scorer_selection=scorers, key_token_base_rate=0.27)


class _FakeBench:
    """A test double of the harness object (``runner.Benchmark``), with only what ``_plots`` reads of it."""

    def __init__(self, out, curves=True):
        self.seeds, self.out = SEEDS, out
        self.spec = types.SimpleNamespace(curves=curves)  # KeywordSpec(curves=...): whether the curve plots exist

    def path(self, name):
        return os.path.join(self.out, name)


def _drawn_intervals(ax):
    """(x, y) of every vertex of the error bars and bands on an axes (LineCollection / PolyCollection)."""
    from matplotlib.collections import LineCollection, PolyCollection

    points = []
    for c in ax.collections:
        if isinstance(c, LineCollection):
            points += [tuple(p) for seg in c.get_segments() for p in seg]
        elif isinstance(c, PolyCollection):
            points += [tuple(p) for path in c.get_paths() for p in path.vertices]
    return points


def _inside(points, axis, metric):
    lo, hi = kr.BOUNDS[metric]
    return all(lo - 1e-9 <= p[axis] <= hi + 1e-9 for p in points)


def test_the_plots_render_and_every_interval_stays_in_bounds(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weak = ["sepo", "sepo_random", "sepo_truth", "dpo_nll", "simpo", "wmle", "confidence"]
    strong = ["w2s_sepo", "w2s_dpo_nll"]
    evaluations, metrics = _run(weak, strong)
    # The made-up spread is wide enough that the clipping is what keeps the intervals inside.
    assert metrics["kl_to_sft"]["sepo"] - metrics["ci95"]["kl_to_sft"]["sepo"] < 0
    assert metrics["ground_truth_reward"]["sepo"] + metrics["ci95"]["ground_truth_reward"]["sepo"] > 1
    assert metrics["selection_precision"]["sepo"] + metrics["ci95"]["selection_precision"]["sepo"] > 1

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    kr._plots(_FakeBench(str(tmp_path)), evaluations, weak, strong, metrics)
    for fig in figures:
        close(fig)
    frontier, curves, selection = figures

    for name in ("frontier.png", "reward_curve.png", "selection.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    panels = [ax for ax in frontier.axes if ax.get_title()]
    assert len(panels) == 5  # selective, sequence level, token RM, controls; the strong policy
    for ax in panels:
        points = _drawn_intervals(ax)
        assert points and _inside(points, 0, "kl_to_sft") and _inside(points, 1, "ground_truth_reward")
    columns = len(curves.axes) // 2
    for row, metric in enumerate(("ground_truth_reward", "format_validity")):
        for ax in curves.axes[row * columns:(row + 1) * columns]:
            points = _drawn_intervals(ax)
            assert points and _inside(points, 1, metric), (metric, ax.get_title())
    for ax in selection.axes:
        points = _drawn_intervals(ax)
        assert points and _inside(points, 1, "selection_precision")
        assert all(0 <= bar.get_height() <= 1 for bar in ax.patches)

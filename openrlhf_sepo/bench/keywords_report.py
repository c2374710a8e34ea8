"""The demo's report: per-seed evaluations -> metrics.json (means, 95% intervals, per-seed values), report.md,
and the plots (reward-KL frontier, curves with seed bands, selection quality).

Intervals and paired differences come from ``bench.stats``. Everything task-specific is read from the run's spec
(``bench.spec``, a ``keywords.KeywordSpec``): its methods, grid, objective and comparisons.
"""

import json
import os
import subprocess
import sys

from openrlhf_sepo.bench.runner import BATCH
from openrlhf_sepo.bench.stats import format_ci, mean_ci95, paired_ci95, paired_differences, reading, summarize

# Token scorers whose selection is reported: the DPO oracle, the learned token RM, the oracle of another tokenizer.
SCORERS = ("oracle", "token_rm", "oracle_x")
METRICS = ("ground_truth_reward", "format_validity", "kl_to_sft", "win_rate_vs_sft", "pairwise_accuracy")
LABELS = {"ground_truth_reward": "ground truth", "format_validity": "format validity", "kl_to_sft": "KL to SFT",
          "win_rate_vs_sft": "win rate vs SFT", "pairwise_accuracy": "pairwise acc.",
          "selection_precision": "selection precision", "training_tokens": "training tokens",
          "cue_rate": "spurious cue rate"}
# Done markers whose seconds the wall-time table reports (besides the methods' own and their loop rounds').
STAGES = ("data", "sft", "strong_sft", "oracle", "scores", "truth", "evaluate", "token_rm", "scores_token_rm",
          "sft_x", "oracle_x", "scores_x")


def write_report(bench) -> dict:
    """Write metrics.json, report.md and the plots for a finished benchmark run (``bench``, a
    ``runner.Benchmark`` of the key-word spec); returns the metrics document."""
    spec, seeds = bench.spec, bench.seeds
    evaluations = bench.evaluations()
    weak = [m for m in bench.methods if spec.METHODS[m]["policy"] == "weak"]
    strong = [m for m in bench.methods if spec.METHODS[m]["policy"] == "strong"]
    models = (["sft", "oracle", *weak] if weak else []) + (["strong_sft", *strong] if strong else [])

    metric_names = METRICS + (("cue_rate",) if spec.testbed else ())
    per_seed = _per_seed(evaluations, seeds, models, metric_names)
    summary = summarize(per_seed)
    wall = _wall_times(bench)
    metrics = {metric: {m: mv[0] for m, mv in summary[metric].items()} for metric in summary}
    metrics.update(
        **_selection_metrics(evaluations, seeds),
        wall_time_s=wall,
        ci95={metric: {m: mv[1] for m, mv in summary[metric].items()} for metric in summary},
        per_seed=per_seed,
        seeds=seeds,
        task={"variant": spec.task, "label_noise": spec.label_noise, "ood": spec.ood, "policy_steps": bench.steps,
              "global_batch": BATCH, **bench.size, **(spec.testbed.as_dict() if spec.testbed else {}),
              "mean_response_tokens": sum(e["selection"]["mean_response_tokens"] for e in evaluations.values())
              / len(evaluations)},
        settings={m: bench.settings[m] for m in bench.methods},
        weak_to_strong={m: summary["ground_truth_reward"][m][0] for m in (["strong_sft", *strong] if strong else [])},
    )
    metrics["ground_truth_differences"] = paired_differences(per_seed["ground_truth_reward"], spec.COMPARISONS)
    with open(bench.path("metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)

    _plots(bench, evaluations, weak, strong, metrics)
    subprocess.run([sys.executable, "-m", "openrlhf_sepo.cli.score_report", bench.seed_path(seeds[0], "scores"),
                    "--out", bench.path("report"), "--k", "0.3"], check=True, stdout=subprocess.DEVNULL)
    _markdown(bench, evaluations, models, summary, metrics, wall)
    return metrics


def _per_seed(evaluations, seeds, models, metric_names) -> dict:
    """{metric: {model: [value per seed]}}: the final metrics, and the training selection of the selective runs."""
    per_seed = {metric: {m: [evaluations[s]["final"][m][metric] for s in seeds] for m in models}
                for metric in metric_names}
    selection = {key: {m: [evaluations[s]["selection"][key][m] for s in seeds]
                       for m in evaluations[seeds[0]]["selection"][key]}
                 for key in ("precision", "recall", "training_tokens")}
    per_seed["selection_precision"] = selection["precision"]
    per_seed["selection_recall"] = selection["recall"]
    per_seed["training_tokens"] = selection["training_tokens"]
    return per_seed


def _wall_times(bench) -> dict:
    """{stage or job: mean wall seconds per seed} from the done markers of this run's stages and methods."""
    times = {}
    loop_jobs = tuple(f"{m}_r" for m in bench.methods if bench.spec.METHODS[m]["trainer"] == "wmle_loop")
    stages = {*STAGES, *bench.methods}
    for seed in bench.seeds:
        done = bench.seed_path(seed, "done")
        for name in os.listdir(done):
            stage = name.removesuffix(".done")
            if stage not in stages and not (loop_jobs and stage.startswith(loop_jobs)):  # e.g. a --sweep's jobs
                continue
            with open(os.path.join(done, name)) as f:
                times.setdefault(name.removesuffix(".done"), []).append(float(f.read()))
    return {name: round(sum(v) / len(v), 1) for name, v in sorted(times.items())}


def _selection_metrics(evaluations, seeds) -> dict:
    """The scorers' selection against the planted key tokens: the oracle's mean by k, each scorer's mean and 95%
    interval by k, and each other scorer minus the oracle seed by seed; the key tokens' base rate."""
    first = evaluations[seeds[0]]["selection"]

    def values(s, scorer, side, k):
        return evaluations[s]["selection"][f"{scorer}_{side}"][k]

    return dict(
        key_token_base_rate=sum(evaluations[s]["selection"]["base_rate"] for s in seeds) / len(seeds),
        oracle_selection={
            side: {k: sum(values(s, "oracle", side, k) for s in seeds) / len(seeds) for k in first[f"oracle_{side}"]}
            for side in ("precision", "recall")},
        # Each scorer's per-response selection by k, mean and 95% interval over seeds: [mean, half-width].
        scorer_selection={
            scorer: {side: {k: list(mean_ci95([values(s, scorer, side, k) for s in seeds]))
                            for k in first[f"{scorer}_{side}"]} for side in ("precision", "recall")}
            for scorer in SCORERS if f"{scorer}_precision" in first},
        # scorer - oracle, seed by seed (the scorers select on the same pairs of a seed): [mean, half-width].
        scorer_selection_differences={
            f"{scorer} - oracle": {
                side: {k: list(paired_ci95([values(s, scorer, side, k) for s in seeds],
                                           [values(s, "oracle", side, k) for s in seeds]))
                       for k in first[f"oracle_{side}"]} for side in ("precision", "recall")}
            for scorer in SCORERS[1:] if f"{scorer}_precision" in first},
    )


def _markdown(bench, evaluations, models, summary, metrics, wall):
    spec, seeds = bench.spec, bench.seeds
    names = [m for m in (*METRICS, "cue_rate") if m in summary]
    knobs = ", ".join(f"{k} {v}" for k, v in spec.testbed.as_dict().items()) if spec.testbed else ""
    lines = [
        "# SePO benchmark on the embedded key-word task", "",
        *([f"Testbed task: {knobs}; mean response {metrics['task']['mean_response_tokens']:.1f} tokens, key-token "
           f"base rate {metrics['key_token_base_rate']:.3f}. Spurious cue rate: the share of an answer's non-key "
           "words that are the cue's (the truth ignores them).", ""] if spec.testbed else []),
        f"Task variant `{spec.task}` (label noise {spec.label_noise}"
        f"{'; out of distribution: oracle and policy pairs from disjoint topic and filler slices' if spec.ood else ''}"
        f"); seeds {seeds} (each redraws data, "
        f"base models, SFT, oracle, scores and policies); {bench.steps} optimizer steps of {BATCH} pairs per policy; "
        f"settings from `{os.path.basename(bench.args.settings)}`. Mean ± 95% interval over {len(seeds)} seeds "
        "(Student t), on test prompts whose "
        "topics no training row and no validation prompt uses. KL and win rate are against the model's own SFT "
        "start (w2s_* rows: the strong SFT model).", "",
        "| model | " + " | ".join(LABELS[m] for m in (*names, "selection_precision", "training_tokens")) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for m in models:
        cells = [format_ci(*summary[metric][m], signed=metric == "ground_truth_reward") for metric in names]
        prec = summary["selection_precision"].get(m)
        cells.append(format_ci(*prec) if prec else "-")
        tok = summary["training_tokens"].get(m)
        cells.append(f"{tok[0]:.0f}" if tok else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences in ground-truth reward (seed by seed)", "",
              "| difference | mean ± 95% interval | reading |", "|---|---|---|"]
    for name, d in metrics["ground_truth_differences"].items():
        lines.append(f"| {name} | {format_ci(d['mean'], d['ci95'], signed=True)} | {reading(d['mean'], d['ci95'])} |")
    lines += _selection_lines(metrics) + (_curve_lines() if spec.curves else []) + _settings_lines(bench)
    lines += ["", f"## Sample answers (seed {seeds[0]}, test prompts)", ""]
    for m in models:
        for text in evaluations[seeds[0]]["final"][m]["samples"][:2]:
            lines.append(f"- **{m}**: {json.dumps(text)}")
    lines += ["", "## Wall time (s, mean per seed)", "", "| job | seconds |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in wall.items()], "",
              "[Token view](report/index.html) (seed 0): each token shaded by its oracle reward, the tokens "
              "selected at k = 0.3 marked."]
    with open(bench.path("report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _selection_lines(metrics) -> list:
    return [
        "", "## Selection against the planted key tokens", "",
        f"Key tokens of the side's sign (good words in chosen answers, bad ones in rejected) are "
        f"{metrics['key_token_base_rate']:.1%} of response tokens. Each scorer's per-response selection, by k "
        "(oracle: the DPO oracle against the SFT model; token_rm: the learned token reward model; oracle_x: a DPO "
        "oracle of another tokenizer, its rewards mapped onto the policy's tokens):", "",
        "| scorer | k | precision | recall |", "|---|---|---|---|",
        *[f"| {scorer} | {k} | {format_ci(*sel['precision'][k])} | {format_ci(*sel['recall'][k])} |"
          for scorer, sel in metrics["scorer_selection"].items() for k in sel["precision"]],
        *[f"| {name} (seed by seed) | {k} | {format_ci(*d['precision'][k], signed=True)} | "
          f"{format_ci(*d['recall'][k], signed=True)} |"
          for name, d in metrics["scorer_selection_differences"].items() for k in d["precision"]],
        "", "![selection](selection.png)", "",
    ]


def _curve_lines() -> list:
    return ["## Reward against KL to the SFT model", "",
            "One point per method and checkpoint (mean over seeds), the final one with its 95% intervals.", "",
            "![frontier](frontier.png)", "", "## During training", "", "![curves](reward_curve.png)", ""]


def _settings_lines(bench) -> list:
    spec = bench.spec
    lines = [
        "## Settings", "",
        f"Chosen per method on the grid lr {spec.GRID['lr']} x beta ({spec.GRID['sepo_beta']} for SePO / SimPO, "
        f"{spec.GRID['dpo_beta']} for DPO; lr {spec.GRID['ppo_lr']} for the PPO arms) by {spec.OBJECTIVE}, "
        "on validation prompts.", "",
        "| method | lr | beta | trainer | selection | k | common prefix | NLL | policy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in bench.methods:
        method, s = spec.METHODS[m], bench.settings[m]
        sel = f"{method.get('selection')} ({method.get('scores')})" if method["trainer"] == "sepo" else "-"
        prefix = ("excluded" if method.get("exclude_prefix") else "selectable") if method["trainer"] == "sepo" else "-"
        beta = f"{s['beta']:g}" if "beta" in s else "-"
        lines.append(f"| {m} | {s['lr']:g} | {beta} | {method['trainer']} | {sel} | {method.get('k', '-')} | "
                     f"{prefix} | {method['nll']:g} | {method['policy']} |")
    return lines


# --- the plots -------------------------------------------------------------------------------------------------------
# Each plotted metric's natural range: every interval drawn (error bar, band) is clipped to it (``clip_interval``).
BOUNDS = {"ground_truth_reward": (-1.0, 1.0), "kl_to_sft": (0.0, float("inf")), "format_validity": (0.0, 1.0),
          "win_rate_vs_sft": (0.0, 1.0), "pairwise_accuracy": (0.0, 1.0), "selection_precision": (0.0, 1.0),
          "selection_recall": (0.0, 1.0), "cue_rate": (0.0, 1.0)}
# Each method's (colour, marker), whatever subset a run trains: the colours differ within every panel (a family and
# the references), the pairs across all methods; a w2s_* method takes its weak counterpart's colour (no weak method
# shares its panel). A name not listed gets a pair from its name (``_style``).
STYLES = {
    # selective
    "sepo": ("tab:green", "o"), "sepo_exclude_prefix": ("tab:brown", "v"), "sepo_paper": ("tab:purple", "D"),
    "sepo_paper_exclude_prefix": ("tab:pink", "^"), "sepo_nll_skip": ("tab:cyan", "P"),
    "confidence": ("tab:orange", "X"),
    # sequence level
    "dpo_nll": ("tab:blue", "s"), "dpo": ("tab:cyan", "v"), "simpo_nll": ("tab:red", "D"), "simpo": ("tab:orange", "^"),
    "sft_chosen": ("tab:brown", "X"),
    # token reward model
    "sepo_token_rm": ("tab:purple", "P"), "wmle": ("tab:red", "^"), "wmle_onpolicy": ("tab:orange", "v"),
    # controls
    "sepo_truth": ("black", "D"), "sepo_random": ("tab:gray", "v"), "wmle_truth": ("tab:red", "X"),
    "sepo_truth_nll_skip": ("tab:pink", "P"),
    # weak to strong
    "w2s_sepo": ("tab:green", "h"), "w2s_dpo_nll": ("tab:blue", "H"), "w2s_simpo_nll": ("tab:red", "d"),
    "w2s_x_sepo": ("tab:pink", "p"),
    # PPO (OpenRLHF's Ray PPO; bandit, and dense from the oracle or the token RM)
    "ppo": ("tab:olive", "<"), "ppo_dense": ("tab:red", ">"), "ppo_dense_token_rm": ("tab:purple", "p"),
}
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan", "black")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "H", "d", "p", "<", ">")  # "*" marks the SFT model
# The weak policy's panels, in this order (``_family`` places a method); the strong policy's methods share one more.
FAMILIES = {"selective": "selective (SePO and kin)", "sequence": "sequence level", "token_rm": "token reward model",
            "controls": "controls (dashed)", "ppo": "PPO (bandit and dense)", "other": "other methods"}
REFERENCES = ("sepo", "dpo_nll")  # drawn faint in every weak panel they are not members of


def clip_interval(metric, mean, half_width) -> tuple:
    """The interval ``mean ± half_width`` clipped to the metric's ``BOUNDS``: ``(low, high)``, both within them; a NaN
    half-width (one seed) gives the point alone."""
    lo, hi = BOUNDS[metric]
    half_width = 0.0 if half_width != half_width else half_width
    return min(max(lo, mean - half_width), hi), max(min(hi, mean + half_width), lo)


def _errors(metric, means, half_widths) -> list:
    """matplotlib's asymmetric error lengths ``[below, above]`` of the clipped intervals; none for a mean that lies
    outside the bounds itself (a KL estimate below 0), so that no bar leaves them."""
    lo, hi = BOUNDS[metric]
    below, above = [], []
    for mean, hw in zip(means, half_widths):
        low, high = clip_interval(metric, mean, hw) if lo <= mean <= hi else (mean, mean)
        below.append(mean - low)
        above.append(high - mean)
    return [below, above]


def _family(method) -> str:
    """The key in ``FAMILIES`` of a weak-policy method, by its name (``weak_to_strong`` for a w2s_* one)."""
    if method.startswith("w2s_"):
        return "weak_to_strong"
    if method.startswith("ppo"):
        return "ppo"
    if "_truth" in method or method.endswith("_random"):
        return "controls"
    if method == "sepo_token_rm" or method.startswith("wmle"):
        return "token_rm"
    if method.startswith("sepo") or method == "confidence":
        return "selective"
    if method.startswith(("dpo", "simpo")) or method == "sft_chosen":
        return "sequence"
    return "other"


def _style(method) -> dict:
    """The method's matplotlib color, marker and linestyle (dashed: a control). Not in ``STYLES``: a pair no listed
    method has, picked from the name alone (two unlisted names may share one)."""
    if method in STYLES:
        color, marker = STYLES[method]
    else:
        taken = set(STYLES.values())
        free = [(c, m) for m in MARKERS for c in PALETTE if (c, m) not in taken]
        color, marker = free[sum((i + 1) * ord(ch) for i, ch in enumerate(method)) % len(free)]
    return dict(color=color, marker=marker, linestyle="--" if _family(method) == "controls" else "-")


def _panels(weak, strong) -> list:
    """(title, SFT model, methods, references) per panel: each family of the weak policy's methods that ran, then the
    strong policy's methods."""
    panels = []
    for key, title in FAMILIES.items():
        members = [m for m in weak if _family(m) == key]
        if members:
            panels.append((f"weak policy: {title}", "sft", members,
                           [r for r in REFERENCES if r in weak and r not in members]))
    if strong:
        panels.append(("strong policy (hidden 128), weak oracle", "strong_sft", strong, []))
    return panels


def _curve(evaluations, seeds, method, metric):
    """(steps, means, 95% half-widths) of a method's checkpoints over the seeds."""
    steps = sorted(evaluations[seeds[0]]["curves"][method], key=int)
    stats = [mean_ci95([evaluations[s]["curves"][method][st][metric] for s in seeds]) for st in steps]
    return [int(st) for st in steps], [x[0] for x in stats], [x[1] for x in stats]


def _plots(bench, evaluations, weak, strong, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(weak, strong)
    curves = (("frontier.png", _frontier), ("reward_curve.png", _curves)) if bench.spec.curves else ()
    for name, plot in (*curves, ("selection.png", _selection_bars)):
        fig = plot(plt, bench.seeds, evaluations, panels, metrics)
        fig.savefig(bench.path(name), dpi=120)
        plt.close(fig)


def _frontier(plt, seeds, evaluations, panels, metrics):
    """Ground truth against KL along each method's checkpoints, a panel per family; the final point larger, with its
    95% intervals (a reference's without)."""
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.5 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax, (title, sft, members, refs) in zip(axes, panels):
        for m in refs + members:
            style, faint = _style(m), m in refs
            kl = _curve(evaluations, seeds, m, "kl_to_sft")[1]
            gt = _curve(evaluations, seeds, m, "ground_truth_reward")[1]
            ax.plot(kl, gt, **style, markersize=3, linewidth=1.0 if faint else 1.5, alpha=0.3 if faint else 0.85,
                    label=f"{m} (reference)" if faint else m)
            final = dict(color=style["color"], marker=style["marker"], linestyle="none", markeredgecolor="white",
                         markeredgewidth=0.6)
            if faint:
                ax.plot(kl[-1:], gt[-1:], markersize=5, alpha=0.3, **final)
            else:
                ax.errorbar(kl[-1:], gt[-1:], markersize=7, capsize=3, **final,
                            xerr=_errors("kl_to_sft", kl[-1:], [metrics["ci95"]["kl_to_sft"][m]]),
                            yerr=_errors("ground_truth_reward", gt[-1:], [metrics["ci95"]["ground_truth_reward"][m]]))
        ax.scatter([0], [metrics["ground_truth_reward"][sft]], color="gold", edgecolor="black", marker="*", s=170,
                   zorder=5, label=sft)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KL to the SFT model (nats per answer)", fontsize=9)
        ax.set_ylabel("ground-truth reward (test prompts)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    weak = [ax for ax, panel in zip(axes, panels) if panel[1] == "sft"]
    for ax in weak[1:]:  # one scale for the weak policy's panels, so that they compare
        ax.sharex(weak[0])
        ax.sharey(weak[0])
    if weak:
        weak[0].autoscale()
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    note = [f"Each checkpoint a point (mean over {len(seeds)} seeds);", "the final one larger, with 95% intervals",
            "clipped to KL >= 0 and ground truth in [-1, 1].", f"Faint: the references ({', '.join(REFERENCES)}).",
            "Dashed: the controls. Star: the SFT start."]
    if len(axes) > len(panels):
        axes[-1].text(0.0, 0.5, "\n".join(note), fontsize=10, va="center", linespacing=1.6,
                      transform=axes[-1].transAxes)
    else:
        fig.suptitle(" ".join(note), fontsize=9)
    fig.tight_layout()
    return fig


def _curves(plt, seeds, evaluations, panels, metrics):
    """Ground truth and format validity against the step, a column per family: mean over seeds, 95% band."""
    rows = ("ground_truth_reward", "format_validity")
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(4.2 * len(panels), 8.0), squeeze=False, sharex=True,
                             sharey="row", layout="constrained")
    for col, (title, sft, members, refs) in enumerate(panels):
        for row, metric in enumerate(rows):
            ax = axes[row][col]
            for m in refs + members:
                style, faint = _style(m), m in refs
                x, mean, hw = _curve(evaluations, seeds, m, metric)
                ax.plot(x, mean, **style, markersize=3.5, linewidth=1.0 if faint else 1.5,
                        alpha=0.3 if faint else 0.9, label=f"{m} (reference)" if faint else m)
                if not faint:
                    low, high = zip(*(clip_interval(metric, a, b) for a, b in zip(mean, hw)))
                    ax.fill_between(x, low, high, color=style["color"], alpha=0.1, linewidth=0)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(LABELS[metric])
            if row == len(rows) - 1:
                ax.set_xlabel("optimizer step")
        axes[0][col].set_title(title, fontsize=9)
        axes[-1][col].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle(f"Mean over {len(seeds)} seeds, 95% bands (clipped to each metric's range)", fontsize=10)
    return fig


def _selection_bars(plt, seeds, evaluations, panels, metrics):
    """Each selective policy's training selection (bars in its colour), and each scorer's by k, against the key-token
    base rate; precision solid, recall hatched."""
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    sides = {"precision": dict(alpha=0.9), "recall": dict(alpha=0.45, hatch="//", edgecolor="white")}
    names = list(metrics["selection_precision"])
    for offset, side in zip((-0.2, 0.2), sides):
        key = f"selection_{side}"
        means = [metrics[key][n] for n in names]
        axes[0].bar([i + offset for i in range(len(names))], means, width=0.4, capsize=2, **sides[side],
                    color=[_style(n)["color"] for n in names],
                    yerr=_errors(key, means, [metrics["ci95"][key][n] for n in names]))
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[0].set_title("Training selection vs planted key tokens", fontsize=10)
    scorers = metrics["scorer_selection"]
    ks = list(scorers["oracle"]["precision"])
    width = 0.8 / (2 * len(scorers))
    for n, (scorer, side) in enumerate((sc, sd) for sc in scorers for sd in sides):
        values = [scorers[scorer][side][k] for k in ks]
        axes[1].bar([i - 0.4 + (n + 0.5) * width for i in range(len(ks))], [v[0] for v in values], width=width,
                    yerr=_errors(f"selection_{side}", [v[0] for v in values], [v[1] for v in values]), capsize=2,
                    color=PALETTE[list(scorers).index(scorer)], **sides[side], label=f"{scorer} {side}")
    axes[1].set_xticks(range(len(ks)), [f"k={k}" for k in ks])
    axes[1].set_title("Scorer selection by k", fontsize=10)
    for ax in axes:
        ax.axhline(metrics["key_token_base_rate"], color="black", linestyle="--", label="key-token base rate")
        ax.set_ylim(0, 1.02)
    axes[0].legend(handles=[Patch(facecolor="gray", **sides["precision"], label="precision"),
                            Patch(facecolor="gray", **sides["recall"], label="recall"), axes[0].lines[-1]],
                   fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Mean over {len(seeds)} seeds, 95% intervals clipped to [0, 1]", fontsize=10)
    fig.tight_layout()
    return fig

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
COLORS = {"sepo": "tab:green", "sepo_exclude_prefix": "tab:brown", "sepo_paper_exclude_prefix": "tab:cyan",
          "sepo_paper": "olive",
          "sepo_random": "tab:gray", "sepo_truth": "black", "dpo": "tab:blue", "simpo": "tab:orange"}
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
    lines += _selection_lines(metrics) + _settings_lines(bench)
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
        "## Reward against KL to the SFT model", "",
        "One point per method and checkpoint (mean over seeds), the final one with its 95% intervals.", "",
        "![frontier](frontier.png)", "",
        "## During training", "", "![curves](reward_curve.png)", "",
    ]


def _settings_lines(bench) -> list:
    spec = bench.spec
    lines = [
        "## Settings", "",
        f"Chosen per method on the grid lr {spec.GRID['lr']} x beta ({spec.GRID['sepo_beta']} for SePO / SimPO, "
        f"{spec.GRID['dpo_beta']} for DPO) by {spec.OBJECTIVE}, on validation prompts.", "",
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


def _plots(bench, evaluations, weak, strong, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = ([("weak policy (hidden 64)", "sft", weak)] if weak else []) + (
        [("strong policy (hidden 128), weak oracle", "strong_sft", strong)] if strong else [])
    for name, plot, shape in (("frontier.png", _frontier, (1, len(families), (6.5 * len(families), 4.6))),
                              ("reward_curve.png", _curves, (1, 2, (12, 4.2))),
                              ("selection.png", _selection_bars, (1, 2, (11, 3.8)))):
        fig, axes = plt.subplots(shape[0], shape[1], figsize=shape[2], squeeze=False)
        plot(fig, axes[0], bench, evaluations, families, weak + strong, metrics)
        fig.tight_layout()
        fig.savefig(bench.path(name), dpi=120)
        plt.close(fig)


def _style(bench, method):
    base = method.removeprefix("w2s_").removesuffix("_nll")
    return COLORS.get(base, "tab:purple"), "-" if bench.spec.METHODS[method]["nll"] else ":"  # dotted: no NLL term


def _frontier(fig, axes, bench, evaluations, families, methods, metrics):
    """Ground truth against KL, along each method's checkpoints; the final point with its 95% intervals."""
    seeds = bench.seeds
    for ax, (title, sft, family) in zip(axes, families):
        for m in family:
            steps = sorted(evaluations[seeds[0]]["curves"][m], key=int)
            kl = [sum(evaluations[s]["curves"][m][st]["kl_to_sft"] for s in seeds) / len(seeds) for st in steps]
            gt = [sum(evaluations[s]["curves"][m][st]["ground_truth_reward"] for s in seeds) / len(seeds)
                  for st in steps]
            color, line = _style(bench, m)
            ax.plot(kl, gt, marker="o", markersize=3, color=color, linestyle=line, alpha=0.8, label=m)
            ax.errorbar(kl[-1], gt[-1], xerr=metrics["ci95"]["kl_to_sft"][m],
                        yerr=metrics["ci95"]["ground_truth_reward"][m], color=color, capsize=3, marker="s")
        ax.scatter([0], [metrics["ground_truth_reward"][sft]], color="red", marker="*", s=120, zorder=5, label=sft)
        ax.set_xlabel("KL to the SFT model (nats per answer, from the policy's samples)")
        ax.set_ylabel("ground-truth reward (test prompts)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def _curves(fig, axes, bench, evaluations, families, methods, metrics):
    """Ground truth and format validity against the step, mean over seeds with a 95% band."""
    seeds = bench.seeds
    for ax, metric in zip(axes, ("ground_truth_reward", "format_validity")):
        for m in methods:
            steps = sorted(evaluations[seeds[0]]["curves"][m], key=int)
            stats = [mean_ci95([evaluations[s]["curves"][m][st][metric] for s in seeds]) for st in steps]
            mean = [x[0] for x in stats]
            hw = [x[1] if x[1] == x[1] else 0.0 for x in stats]
            color, line = _style(bench, m)
            x = [int(st) for st in steps]
            ax.plot(x, mean, color=color, linestyle=line, marker="o", markersize=3, label=m,
                    alpha=0.5 if m.startswith("w2s_") else 1.0)
            ax.fill_between(x, [a - b for a, b in zip(mean, hw)], [a + b for a, b in zip(mean, hw)], color=color,
                            alpha=0.08)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Mean over {len(seeds)} seeds, 95% bands")


def _selection_bars(fig, axes, bench, evaluations, families, methods, metrics):
    """Each selective policy's training selection, and each scorer's by k, against the key-token base rate."""
    names = list(metrics["selection_precision"])
    x = range(len(names))
    for offset, key in ((-0.2, "selection_precision"), (0.2, "selection_recall")):
        axes[0].bar([i + offset for i in x], [metrics[key][n] for n in names], width=0.4,
                    yerr=[metrics["ci95"][key][n] for n in names], label=key.split("_")[1], capsize=2)
    axes[0].set_xticks(list(x), names, rotation=20, fontsize=8)
    axes[0].set_title("Training selection vs planted key tokens")
    scorers = metrics["scorer_selection"]
    ks = list(scorers["oracle"]["precision"])
    width = 0.8 / (2 * len(scorers))
    for n, (scorer, side) in enumerate((sc, sd) for sc in scorers for sd in ("precision", "recall")):
        values = [scorers[scorer][side][k] for k in ks]
        axes[1].bar([i - 0.4 + (n + 0.5) * width for i in range(len(ks))], [v[0] for v in values], width=width,
                    yerr=[v[1] if v[1] == v[1] else 0 for v in values], capsize=2, label=f"{scorer} {side}")
    axes[1].set_xticks(range(len(ks)), [f"k={k}" for k in ks])
    axes[1].set_title("Scorer selection by k")
    for ax in axes:
        ax.axhline(metrics["key_token_base_rate"], color="black", linestyle="--", label="key-token base rate")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)

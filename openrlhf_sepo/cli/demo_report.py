"""The demo's report: per-seed evaluations -> metrics.json (means, 95% intervals, per-seed values), report.md,
and the plots (reward-KL frontier, curves with seed bands, selection quality).

Intervals are Student-t 95% intervals of the mean over seeds (``demo.mean_ci95``). A paired difference
``a - b`` is computed seed by seed (both methods saw the same data, SFT model and prompts on a seed), so its
interval is narrower than the two intervals side by side suggest.
"""

import json
import os
import subprocess
import sys

from openrlhf_sepo.cli.demo import GRID, METHODS, OBJECTIVE, mean_ci95

# Token scorers whose selection is reported: the DPO oracle, the learned token RM, the oracle of another tokenizer.
SCORERS = ("oracle", "token_rm", "oracle_x")
METRICS = ("ground_truth_reward", "format_validity", "kl_to_sft", "win_rate_vs_sft", "pairwise_accuracy")
LABELS = {"ground_truth_reward": "ground truth", "format_validity": "format validity", "kl_to_sft": "KL to SFT",
          "win_rate_vs_sft": "win rate vs SFT", "pairwise_accuracy": "pairwise acc.",
          "selection_precision": "selection precision", "training_tokens": "training tokens"}
# Paired comparisons read in the report: (a, b) -> a - b in ground truth, seed by seed.
COMPARISONS = [("sepo", "dpo_nll"), ("sepo", "simpo_nll"), ("sepo", "sepo_random"), ("sepo_truth", "sepo"),
               ("sepo", "sepo_paper"), ("sepo_exclude_prefix", "sepo"), ("sepo_paper_exclude_prefix", "sepo_paper"),
               ("sepo_paper", "dpo"), ("sepo_paper", "simpo"), ("w2s_sepo", "w2s_dpo_nll"),
               ("w2s_sepo", "w2s_simpo_nll"), ("sepo_token_rm", "sepo"), ("wmle", "sft_chosen"), ("wmle", "sepo"),
               ("wmle", "dpo_nll"), ("wmle_onpolicy", "wmle"), ("sft_chosen", "sft"), ("w2s_x_sepo", "w2s_sepo"),
               ("w2s_x_sepo", "w2s_dpo_nll"), ("w2s_x_sepo", "w2s_simpo_nll")]
COLORS = {"sepo": "tab:green", "sepo_exclude_prefix": "tab:brown", "sepo_paper_exclude_prefix": "tab:cyan",
          "sepo_paper": "olive",
          "sepo_random": "tab:gray", "sepo_truth": "black", "dpo": "tab:blue", "simpo": "tab:orange"}


def _style(method):
    base = method.removeprefix("w2s_").removesuffix("_nll")
    return COLORS.get(base, "tab:purple"), "-" if METHODS[method]["nll"] else ":"  # dotted: no NLL term


def _fmt(mean, hw, digits=3, signed=False):
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if hw != hw else f"{text} ± {hw:.{digits}f}"  # hw != hw: NaN (one seed)


def write_report(demo) -> dict:
    """Write metrics.json, report.md and the plots for a finished benchmark run of ``demo`` (a ``Demo``);
    returns the metrics document."""
    seeds = demo.seeds
    evaluations = {}
    for seed in seeds:
        with open(demo.seed_path(seed, "evaluation.json")) as f:
            evaluations[seed] = json.load(f)
    weak = [m for m in demo.methods if METHODS[m]["policy"] == "weak"]
    strong = [m for m in demo.methods if METHODS[m]["policy"] == "strong"]
    models = (["sft", "oracle", *weak] if weak else []) + (["strong_sft", *strong] if strong else [])

    per_seed = {metric: {m: [evaluations[s]["final"][m][metric] for s in seeds] for m in models}
                for metric in METRICS}
    selection = {key: {m: [evaluations[s]["selection"][key][m] for s in seeds]
                       for m in evaluations[seeds[0]]["selection"][key]}
                 for key in ("precision", "recall", "training_tokens")}
    per_seed["selection_precision"] = selection["precision"]
    per_seed["selection_recall"] = selection["recall"]
    per_seed["training_tokens"] = selection["training_tokens"]
    summary = {metric: {m: mean_ci95(v) for m, v in values.items()} for metric, values in per_seed.items()}

    times = {}
    for seed in seeds:
        done = demo.seed_path(seed, "done")
        stages = {"data", "sft", "strong_sft", "oracle", "scores", "truth", "evaluate", "token_rm", "scores_token_rm",
                  "sft_x", "oracle_x", "scores_x",
                  *demo.methods}
        loop_jobs = tuple(f"{m}_r" for m in demo.methods if METHODS[m]["trainer"] == "wmle_loop")
        for name in os.listdir(done):
            stage = name.removesuffix(".done")
            if stage not in stages and not (loop_jobs and stage.startswith(loop_jobs)):  # e.g. a --sweep's jobs
                continue
            with open(os.path.join(done, name)) as f:
                times.setdefault(name.removesuffix(".done"), []).append(float(f.read()))
    wall = {name: round(sum(v) / len(v), 1) for name, v in sorted(times.items())}

    first = evaluations[seeds[0]]["selection"]
    metrics = {metric: {m: mv[0] for m, mv in summary[metric].items()} for metric in summary}
    metrics.update(
        key_token_base_rate=sum(evaluations[s]["selection"]["base_rate"] for s in seeds) / len(seeds),
        oracle_selection={
            side: {k: sum(evaluations[s]["selection"][f"oracle_{side}"][k] for s in seeds) / len(seeds)
                   for k in first[f"oracle_{side}"]}
            for side in ("precision", "recall")},
        # Each scorer's per-response selection by k, mean and 95% interval over seeds: [mean, half-width].
        scorer_selection={
            scorer: {side: {k: list(mean_ci95([evaluations[s]["selection"][f"{scorer}_{side}"][k] for s in seeds]))
                            for k in first[f"{scorer}_{side}"]} for side in ("precision", "recall")}
            for scorer in SCORERS if f"{scorer}_precision" in first},
        # scorer - oracle, seed by seed (the scorers select on the same pairs of a seed): [mean, half-width].
        scorer_selection_differences={
            f"{scorer} - oracle": {
                side: {k: list(mean_ci95([evaluations[s]["selection"][f"{scorer}_{side}"][k]
                                          - evaluations[s]["selection"][f"oracle_{side}"][k] for s in seeds]))
                       for k in first[f"oracle_{side}"]} for side in ("precision", "recall")}
            for scorer in SCORERS[1:] if f"{scorer}_precision" in first},
        wall_time_s=wall,
        ci95={metric: {m: mv[1] for m, mv in summary[metric].items()} for metric in summary},
        per_seed=per_seed,
        seeds=seeds,
        task={"variant": demo.args.task, "label_noise": demo.args.label_noise, "ood": demo.args.ood,
              "policy_steps": demo.steps,
              "global_batch": 32, **demo.size},
        settings={m: demo.settings[m] for m in demo.methods},
        weak_to_strong={m: summary["ground_truth_reward"][m][0] for m in (["strong_sft", *strong] if strong else [])},
    )
    differences = {}
    for a, b in COMPARISONS:
        if a in per_seed["ground_truth_reward"] and b in per_seed["ground_truth_reward"]:
            diff = [x - y for x, y in zip(per_seed["ground_truth_reward"][a], per_seed["ground_truth_reward"][b])]
            differences[f"{a} - {b}"] = dict(zip(("mean", "ci95"), mean_ci95(diff)))
    metrics["ground_truth_differences"] = differences
    with open(demo.path("metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)

    _plots(demo, evaluations, weak, strong, metrics)
    subprocess.run([sys.executable, "-m", "openrlhf_sepo.cli.score_report", demo.seed_path(seeds[0], "scores"),
                    "--out", demo.path("report"), "--k", "0.3"], check=True, stdout=subprocess.DEVNULL)
    _markdown(demo, evaluations, models, summary, metrics, wall)
    return metrics


def _markdown(demo, evaluations, models, summary, metrics, wall):
    seeds = demo.seeds
    n = len(seeds)
    lines = [
        "# SePO benchmark on the embedded key-word task", "",
        f"Task variant `{demo.args.task}` (label noise {demo.args.label_noise}"
        f"{'; out of distribution: oracle and policy pairs from disjoint topic and filler slices' if demo.args.ood else ''}"
        f"); seeds {seeds} (each redraws data, "
        f"base models, SFT, oracle, scores and policies); {demo.steps} optimizer steps of {32} pairs per policy; "
        f"settings from `{os.path.basename(demo.args.settings)}`. Mean ± 95% interval over {n} seeds (Student t), on test prompts whose "
        "topics no training row and no validation prompt uses. KL and win rate are against the model's own SFT "
        "start (w2s_* rows: the strong SFT model).", "",
        "| model | " + " | ".join(LABELS[m] for m in (*METRICS, "selection_precision", "training_tokens")) + " |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for m in models:
        cells = [_fmt(*summary[metric][m], signed=metric == "ground_truth_reward") for metric in METRICS]
        prec = summary["selection_precision"].get(m)
        cells.append(_fmt(*prec) if prec else "-")
        tok = summary["training_tokens"].get(m)
        cells.append(f"{tok[0]:.0f}" if tok else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences in ground-truth reward (seed by seed)", "",
              "| difference | mean ± 95% interval | reading |", "|---|---|---|"]
    for name, d in metrics["ground_truth_differences"].items():
        hw = d["ci95"]
        reading = "interval excludes 0" if hw == hw and abs(d["mean"]) > hw else "not distinguishable"
        lines.append(f"| {name} | {_fmt(d['mean'], hw, signed=True)} | {reading} |")
    lines += [
        "", "## Selection against the planted key tokens", "",
        f"Key tokens of the side's sign (good words in chosen answers, bad ones in rejected) are "
        f"{metrics['key_token_base_rate']:.1%} of response tokens. Each scorer's per-response selection, by k "
        "(oracle: the DPO oracle against the SFT model; token_rm: the learned token reward model; oracle_x: a DPO "
        "oracle of another tokenizer, its rewards mapped onto the policy's tokens):", "",
        "| scorer | k | precision | recall |", "|---|---|---|---|",
        *[f"| {scorer} | {k} | {_fmt(*sel['precision'][k])} | {_fmt(*sel['recall'][k])} |"
          for scorer, sel in metrics["scorer_selection"].items() for k in sel["precision"]],
        *[f"| {name} (seed by seed) | {k} | {_fmt(*d['precision'][k], signed=True)} | "
          f"{_fmt(*d['recall'][k], signed=True)} |"
          for name, d in metrics["scorer_selection_differences"].items() for k in d["precision"]],
        "", "![selection](selection.png)", "",
        "## Reward against KL to the SFT model", "",
        "One point per method and checkpoint (mean over seeds), the final one with its 95% intervals.", "",
        "![frontier](frontier.png)", "",
        "## During training", "", "![curves](reward_curve.png)", "",
        "## Settings", "",
        f"Chosen per method on the grid lr {GRID['lr']} x beta ({GRID['sepo_beta']} for SePO / SimPO, "
        f"{GRID['dpo_beta']} for DPO) by {OBJECTIVE}, on validation prompts.", "",
        "| method | lr | beta | trainer | selection | k | common prefix | NLL | policy |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in demo.methods:
        spec, s = METHODS[m], demo.settings[m]
        sel = f"{spec.get('selection')} ({spec.get('scores')})" if spec["trainer"] == "sepo" else "-"
        prefix = ("excluded" if spec.get("exclude_prefix") else "selectable") if spec["trainer"] == "sepo" else "-"
        beta = f"{s['beta']:g}" if "beta" in s else "-"
        lines.append(f"| {m} | {s['lr']:g} | {beta} | {spec['trainer']} | {sel} | {spec.get('k', '-')} | "
                     f"{prefix} | {spec['nll']:g} | {spec['policy']} |")
    lines += ["", f"## Sample answers (seed {seeds[0]}, test prompts)", ""]
    for m in models:
        for text in evaluations[seeds[0]]["final"][m]["samples"][:2]:
            lines.append(f"- **{m}**: {json.dumps(text)}")
    lines += ["", "## Wall time (s, mean per seed)", "", "| job | seconds |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in wall.items()], "",
              "[Token view](report/index.html) (seed 0): each token shaded by its oracle reward, the tokens "
              "selected at k = 0.3 marked."]
    with open(demo.path("report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _plots(demo, evaluations, weak, strong, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = demo.seeds
    families = ([("weak policy (hidden 64)", "sft", weak)] if weak else []) + (
        [("strong policy (hidden 128), weak oracle", "strong_sft", strong)] if strong else [])

    # Frontier: ground truth against KL, along each method's checkpoints; final point with 95% intervals.
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.6), squeeze=False)
    for ax, (title, sft, methods) in zip(axes[0], families):
        for m in methods:
            steps = sorted(evaluations[seeds[0]]["curves"][m], key=int)
            kl = [sum(evaluations[s]["curves"][m][st]["kl_to_sft"] for s in seeds) / len(seeds) for st in steps]
            gt = [sum(evaluations[s]["curves"][m][st]["ground_truth_reward"] for s in seeds) / len(seeds)
                  for st in steps]
            color, line = _style(m)
            ax.plot(kl, gt, marker="o", markersize=3, color=color, linestyle=line, alpha=0.8, label=m)
            ax.errorbar(kl[-1], gt[-1], xerr=metrics["ci95"]["kl_to_sft"][m], yerr=metrics["ci95"]["ground_truth_reward"][m],
                        color=color, capsize=3, marker="s")
        ax.scatter([0], [metrics["ground_truth_reward"][sft]], color="red", marker="*", s=120, zorder=5, label=sft)
        ax.set_xlabel("KL to the SFT model (nats per answer, from the policy's samples)")
        ax.set_ylabel("ground-truth reward (test prompts)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(demo.path("frontier.png"), dpi=120)
    plt.close(fig)

    # Curves: ground truth and format validity against the step, mean over seeds with a 95% band.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric in zip(axes, ("ground_truth_reward", "format_validity")):
        for m in weak + strong:
            steps = sorted(evaluations[seeds[0]]["curves"][m], key=int)
            stats = [mean_ci95([evaluations[s]["curves"][m][st][metric] for s in seeds]) for st in steps]
            mean = [x[0] for x in stats]
            hw = [x[1] if x[1] == x[1] else 0.0 for x in stats]
            color, line = _style(m)
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
    fig.tight_layout()
    fig.savefig(demo.path("reward_curve.png"), dpi=120)
    plt.close(fig)

    # Selection quality: each selective policy's training selection, and the oracle by k.
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
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
    fig.tight_layout()
    fig.savefig(demo.path("selection.png"), dpi=120)
    plt.close(fig)

"""The TKPO benchmark's task spec: TKPO against SFT and DPO on the embedded style task, seeded and tuned (CPU):
``python -m openrlhf_sepo.cli.tkpo_benchmark --output_dir tkpo_output`` runs ``StyleSpec`` through the harness
(``bench.runner``; docs/tkpo.md says what it measures).

The task (``tiny.STYLES``): a prompt asks for a note "in a plain style" or "in a florid style"; an answer follows the
key-word task's template with four slot words from the requested style's word set. ``tiny.style_adherence`` scores
any answer ((requested-style words - other-style words) / 4), ``tiny.is_well_formed_style`` its format.

Per seed everything is redrawn. Stage 1: ``start``, an SFT (OpenRLHF ``train_sft``, ``n_start`` rows, 3 epochs) of a
tiny Llama on rows whose answers are in the requested style or the swapped one at random: the common start, which
follows the answer template but not the requested style (as the key-word task's SFT model is neutral about key
words). Stage 2, from ``start``, the same examples, epochs and batch for every method (``METHODS``):

  sft_more    OpenRLHF train_sft on the policy rows (CE alone: TKPO with lambda 0)
  tkpo        train_tkpo on the same rows: CE + 0.5 * L_TKPO, 20 negatives, tau 0.15, negatives detached
  tkpo_grad   the same with --tkpo.negatives_grad
  dpo         OpenRLHF train_dpo on pairs (an answer in the requested style vs one in the swapped style)
  dpo_nll     the same with OpenRLHF's NLL term (--model.nll_loss_coef 1)

Evaluation on test prompts (topics no training row or validation prompt uses), one sample each at temperature 1:
adherence, format validity, KL to ``start`` (from the policy's own samples). ``--sweep`` chooses each method's
learning rate (and DPO's beta) on validation prompts by adherence, a malformed answer counting -1.
"""

import json
import os
import random

from openrlhf_sepo import tiny
from openrlhf_sepo.bench.runner import BATCH, CHAT, COMMON_TRAIN, Benchmark, sft_job
from openrlhf_sepo.bench.stats import format_ci, paired_differences, reading, summarize

METHODS = {
    "sft_more": dict(trainer="sft"),
    "tkpo": dict(trainer="tkpo", negatives_grad=False),
    "tkpo_grad": dict(trainer="tkpo", negatives_grad=True),
    "dpo": dict(trainer="dpo", nll=0.0),
    "dpo_nll": dict(trainer="dpo", nll=1.0),
}
QUICK_METHODS = ["sft_more", "tkpo", "dpo"]
GRID = {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "dpo_beta": [0.1, 0.5]}
SIZES = {
    "full": dict(n_start=1500, n_policy=384, n_prompts=64, policy_epochs=2),
    "quick": dict(n_start=800, n_policy=96, n_prompts=16, policy_epochs=2),
}
OBJECTIVE = "mean adherence on validation prompts, a malformed answer counting -1"
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tkpo_settings.json")
COMPARISONS = [("tkpo", "sft_more"), ("tkpo", "dpo"), ("tkpo", "dpo_nll"), ("tkpo_grad", "tkpo"),
               ("dpo_nll", "sft_more")]
SWAP = json.dumps(tiny.STYLE_SWAP)
KEYS = ("adherence", "format_validity", "kl_to_start", "win_rate_vs_start")  # the reported metrics


def gated(samples):
    """The tuning objective (``OBJECTIVE``): adherence of well-formed answers, -1 for malformed ones."""
    return sum(s["adherence"] if s["well_formed"] else -1.0 for s in samples) / len(samples)


def run(args) -> dict:
    """The TKPO benchmark for parsed ``cli.tkpo_benchmark`` flags: the benchmark, or with ``args.sweep`` the sweep."""
    return Benchmark(StyleSpec(), args).run()


class StyleSpec:
    """The style task for ``bench.runner.Benchmark`` (its docstring lists what a spec provides)."""

    NAME, POLICY_LAUNCH, DEFAULT_METHODS = "tkpo", "policies", list(METHODS)
    METHODS, QUICK_METHODS, SIZES, GRID, COMPARISONS = METHODS, QUICK_METHODS, SIZES, GRID, COMPARISONS
    OBJECTIVE, OBJECTIVE_KEY, SETTINGS_FILE = OBJECTIVE, "gated_adherence", SETTINGS_FILE

    def grid_points(self, method):
        """lr x DPO's beta for a DPO method, lr alone for the others."""
        betas = self.GRID["dpo_beta"] if self.METHODS[method]["trainer"] == "dpo" else [None]
        return [{"lr": lr, **({"beta": b} if b is not None else {})} for lr in self.GRID["lr"] for b in betas]

    @staticmethod
    def run_name(method, point):
        return f"{method}__" + "_".join(f"{k}{v:g}" for k, v in point.items())

    def make_data(self, bench, seed):
        s, d = bench.size, lambda *p: bench.seed_path(seed, "data", *p)
        tiny.build_style_tokenizer(d("tokenizer"))
        tiny.build_model(d("base"), d("tokenizer"), 64, 2, seed=seed)
        # The start's answers: the requested style or the swapped one, at random (style-neutral, template kept).
        rng = random.Random(1000 * seed + 1)
        with open(d("start.jsonl"), "w") as f:
            for pair in tiny.make_style_pairs(s["n_start"], 1000 * seed + 1):
                answer = pair["chosen"] if rng.random() < 0.5 else pair["rejected"]
                f.write(json.dumps({"messages": [{"role": "user", "content": pair["prompt"]},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
        tiny.write_style_sft_data(d("policy.jsonl"), s["n_policy"], 1000 * seed + 2)
        tiny.write_style_pairs(d("pairs.jsonl"), s["n_policy"], 1000 * seed + 2)
        for split in ("validation", "test"):
            tiny.write_style_prompts(d(f"{split}_prompts.jsonl"), s["n_prompts"], 1000 * seed + 4, split)

    def stage1(self, bench):
        """``start`` of every seed, in one launch."""
        bench.launch("start", [sft_job(bench, seed, "start", bench.seed_path(seed, "data", "base"),
                                       bench.seed_path(seed, "data", "start.jsonl"), 3) for seed in bench.seeds])

    def train(self, bench, runs, snapshots, launch):
        """Every run of ``runs`` ({name: (method, setting)}) on every seed, in one launch (no snapshots)."""
        bench.launch(launch, [self.policy_job(bench, seed, r, m, p) for seed in bench.seeds
                              for r, (m, p) in runs.items()])

    def policy_job(self, bench, seed, name, method, setting):
        spec = self.METHODS[method]
        m, d = lambda *p: bench.seed_path(seed, "models", *p), lambda *p: bench.seed_path(seed, "data", *p)
        args = ["--model.model_name_or_path", m("start"), *COMMON_TRAIN, *CHAT, "--train.max_epochs",
                str(bench.size["policy_epochs"]), "--train.seed", str(seed), "--adam.lr", str(setting["lr"]),
                "--ckpt.output_dir", m(name), "--ckpt.path", bench.seed_path(seed, "ckpt", name)]
        if spec["trainer"] == "sft":
            return bench.job(seed, name, "openrlhf.cli.train_sft",
                             [*args, "--data.dataset", d("policy.jsonl"), "--data.input_key", "messages"])
        if spec["trainer"] == "tkpo":
            args += ["--data.dataset", d("policy.jsonl"), "--data.input_key", "prompt", "--data.output_key",
                     "response", "--tkpo.attribute_key", "style", "--tkpo.swap_map", SWAP]
            return bench.job(seed, name, "openrlhf_sepo.cli.train_tkpo",
                             args + (["--tkpo.negatives_grad"] if spec["negatives_grad"] else []))
        return bench.job(seed, name, "openrlhf.cli.train_dpo", [
            *args, "--ref.model_name_or_path", m("start"), "--data.dataset", d("pairs.jsonl"),
            "--model.beta", str(setting["beta"]), "--model.nll_loss_coef", str(spec["nll"])])

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, bench, seed) -> dict:
        return self.evaluate_seed(bench, seed, bench.methods, "test")

    def validate(self, bench, seed, runs) -> dict:
        return self.evaluate_seed(bench, seed, list(runs), "validation")

    @staticmethod
    def sweep_entry(metrics):
        return metrics["gated_adherence"]

    @staticmethod
    def sweep_context(bench) -> dict:
        return {"sizes": bench.size}

    def evaluate_seed(self, bench, seed, runs, split):
        """{run: metrics} on ``split`` prompts: adherence, format validity, KL to ``start`` (mean of log pi - log
        pi_start over the run's own samples), win rate in adherence against ``start``."""
        from openrlhf_sepo.evaluation import DataFlags, GenFlags, generate, load_policy, response_logprob_sums

        with open(bench.seed_path(seed, "data", f"{split}_prompts.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        prompts, styles = [r["prompt"] for r in rows], [r["style"] for r in rows]
        data = DataFlags(apply_chat_template=True, max_len=128)
        gen = GenFlags(max_new_tokens=48, temperature=1.0, top_p=1.0, seed=seed)
        models = {"start": bench.seed_path(seed, "models", "start"),
                  **{r: bench.seed_path(seed, "models", r) for r in runs}}
        out, samples = {}, {}
        for name, path in models.items():
            model, tok = load_policy(path)
            texts, prompt_ids, response_ids = generate(model, tok, prompts, data, gen, batch_size=32, return_ids=True)
            own = response_logprob_sums(model, prompt_ids, response_ids, 32)
            samples[name] = (texts, prompt_ids, response_ids, own)
        start_model, _ = load_policy(models["start"])
        start_adherence = [tiny.style_adherence(t, s) for t, s in zip(samples["start"][0], styles)]
        for name, (texts, prompt_ids, response_ids, own) in samples.items():
            base = own if name == "start" else response_logprob_sums(start_model, prompt_ids, response_ids, 32)
            items = [{"adherence": tiny.style_adherence(t, s), "well_formed": tiny.is_well_formed_style(t)}
                     for t, s in zip(texts, styles)]
            adherence = [i["adherence"] for i in items]
            out[name] = {
                "adherence": sum(adherence) / len(items),
                "format_validity": sum(i["well_formed"] for i in items) / len(items),
                "kl_to_start": sum(o - b for o, b in zip(own, base)) / len(items),
                "win_rate_vs_start": sum((a > b) + 0.5 * (a == b)
                                         for a, b in zip(adherence, start_adherence)) / len(items),
                "gated_adherence": gated(items),
                "samples": texts[:3],
            }
        return out

    # --- report ---------------------------------------------------------------------------------------
    def report(self, bench, wall_s) -> dict:
        """metrics.json and report.md: the reported metrics' means and 95% intervals over seeds, and adherence
        differences seed by seed."""
        evaluations = bench.evaluations()
        models = ["start", *bench.methods]
        per_seed = {k: {m: [evaluations[s][m][k] for s in bench.seeds] for m in models} for k in KEYS}
        summary = summarize(per_seed)
        differences = paired_differences(per_seed["adherence"], self.COMPARISONS)
        metrics = {**{k: {m: v[0] for m, v in summary[k].items()} for k in KEYS},
                   "ci95": {k: {m: v[1] for m, v in summary[k].items()} for k in KEYS},
                   "per_seed": per_seed, "adherence_differences": differences, "seeds": bench.seeds,
                   "settings": {m: bench.settings[m] for m in bench.methods}, "steps": bench.steps,
                   "sizes": bench.size, "wall_time_s": round(wall_s, 1)}
        with open(bench.path("metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        settings, first = bench.settings, bench.seeds[0]
        lines = ["# TKPO on the embedded style task", "",
                 f"Seeds {bench.seeds}; {bench.steps} optimizer steps of {BATCH} examples per method, all from "
                 f"`start`; settings from `{os.path.basename(bench.args.settings)}`. Mean ± 95% interval over seeds, "
                 "test prompts.",
                 "", "| model | adherence | format validity | KL to start | win rate vs start |",
                 "|---|---|---|---|---|"]
        for m in models:
            cells = [format_ci(*summary[k][m], signed=k == "adherence") for k in KEYS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "| difference in adherence (seed by seed) | mean ± 95% interval | reading |", "|---|---|---|"]
        for name, d in differences.items():
            cell = format_ci(d["mean"], d["ci95"], signed=True)
            lines.append(f"| {name} | {cell} | {reading(d['mean'], d['ci95'])} |")
        lines += ["", "| method | lr | beta |", "|---|---|---|"]
        lines += [f"| {m} | {settings[m]['lr']:g} | {settings[m].get('beta', '-')} |" for m in bench.methods]
        lines += ["", f"Sample answers (seed {first}):", ""]
        lines += [f"- **{m}**: {json.dumps(t)}" for m in models for t in evaluations[first][m]["samples"][:2]]
        with open(bench.path("report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return metrics

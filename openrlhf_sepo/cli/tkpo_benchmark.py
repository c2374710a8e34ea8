"""TKPO against SFT and DPO on the embedded style task, seeded and tuned (CPU): ``python -m
openrlhf_sepo.cli.tkpo_benchmark --output_dir tkpo_output`` (docs/tkpo.md says what it measures).

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

import argparse
import json
import math
import os
import random
import time

from openrlhf_sepo import tiny
from openrlhf_sepo.cli.demo import BATCH, COMMON_TRAIN, Demo, mean_ci95, point_label

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
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tkpo_settings.json")
COMPARISONS = [("tkpo", "sft_more"), ("tkpo", "dpo"), ("tkpo", "dpo_nll"), ("tkpo_grad", "tkpo"),
               ("dpo_nll", "sft_more")]
SWAP = json.dumps(tiny.STYLE_SWAP)
CHAT = ["--data.apply_chat_template"]


def grid_points(method):
    betas = GRID["dpo_beta"] if METHODS[method]["trainer"] == "dpo" else [None]
    return [{"lr": lr, **({"beta": b} if b is not None else {})} for lr in GRID["lr"] for b in betas]


def gated(samples):
    return sum(s["adherence"] if s["well_formed"] else -1.0 for s in samples) / len(samples)


class StyleBenchmark(Demo):
    """The demo's plumbing (launches of jobs, stages, resume markers) on the style task."""

    METHODS, QUICK_METHODS, SIZES = METHODS, QUICK_METHODS, SIZES

    def make_data(self, seed):
        s, d = self.size, lambda *p: self.seed_path(seed, "data", *p)
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

    def start_job(self, seed):
        m, d = lambda *p: self.seed_path(seed, "models", *p), lambda *p: self.seed_path(seed, "data", *p)
        return self.job(seed, "start", "openrlhf.cli.train_sft", [
            "--model.model_name_or_path", d("base"), "--data.dataset", d("start.jsonl"), "--data.input_key",
            "messages", *COMMON_TRAIN, *CHAT, "--train.max_epochs", "3", "--adam.lr", "3e-3",
            "--ckpt.output_dir", m("start"), "--ckpt.path", self.seed_path(seed, "ckpt", "start"),
            "--train.seed", str(seed)])

    def policy_job(self, seed, name, method, setting, snapshots=False):
        spec = METHODS[method]
        m, d = lambda *p: self.seed_path(seed, "models", *p), lambda *p: self.seed_path(seed, "data", *p)
        args = ["--model.model_name_or_path", m("start"), *COMMON_TRAIN, *CHAT, "--train.max_epochs",
                str(self.size["policy_epochs"]), "--train.seed", str(seed), "--adam.lr", str(setting["lr"]),
                "--ckpt.output_dir", m(name), "--ckpt.path", self.seed_path(seed, "ckpt", name)]
        if spec["trainer"] == "sft":
            return self.job(seed, name, "openrlhf.cli.train_sft",
                            [*args, "--data.dataset", d("policy.jsonl"), "--data.input_key", "messages"])
        if spec["trainer"] == "tkpo":
            args += ["--data.dataset", d("policy.jsonl"), "--data.input_key", "prompt", "--data.output_key",
                     "response", "--tkpo.attribute_key", "style", "--tkpo.swap_map", SWAP]
            return self.job(seed, name, "openrlhf_sepo.cli.train_tkpo",
                            args + (["--tkpo.negatives_grad"] if spec["negatives_grad"] else []))
        return self.job(seed, name, "openrlhf.cli.train_dpo", [
            *args, "--ref.model_name_or_path", m("start"), "--data.dataset", d("pairs.jsonl"),
            "--model.beta", str(setting["beta"]), "--model.nll_loss_coef", str(spec["nll"])])

    def evaluate_seed(self, seed, runs, split):
        """{run: metrics} on ``split`` prompts: adherence, format validity, KL to ``start`` (mean of log pi - log
        pi_start over the run's own samples), win rate in adherence against ``start``."""
        from openrlhf_sepo.cli.evaluate import DataFlags, GenFlags, generate, load_policy, response_logprob_sums

        rows = [json.loads(line) for line in open(self.seed_path(seed, "data", f"{split}_prompts.jsonl"))]
        prompts, styles = [r["prompt"] for r in rows], [r["style"] for r in rows]
        data = DataFlags(apply_chat_template=True, max_len=128)
        gen = GenFlags(max_new_tokens=48, temperature=1.0, top_p=1.0, seed=seed)
        models = {"start": self.seed_path(seed, "models", "start"),
                  **{r: self.seed_path(seed, "models", r) for r in runs}}
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
                "win_rate_vs_start": sum((a > b) + 0.5 * (a == b) for a, b in zip(adherence, start_adherence)) / len(items),
                "gated_adherence": gated(items),
                "samples": texts[:3],
            }
        return out

    def prepare(self):
        for seed in self.seeds:
            self.stage(f"data s{seed}", lambda seed=seed: self.make_data(seed), self.seed_path(seed, "done", "data.done"))
        self.launch("start", [self.start_job(seed) for seed in self.seeds])

    def run_benchmark(self):
        started = time.time()
        self.prepare()
        self.launch("policies", [self.policy_job(seed, m, m, self.settings[m]) for seed in self.seeds
                                 for m in self.methods])
        for seed in self.seeds:
            def evaluate(seed=seed):
                with open(self.seed_path(seed, "evaluation.json"), "w") as f:
                    json.dump(self.evaluate_seed(seed, self.methods, "test"), f, indent=1)
            self.stage(f"eval s{seed}", evaluate, self.seed_path(seed, "done", "evaluate.done"))
        metrics = self.report(time.time() - started)
        print(f"[tkpo] finished in {time.time() - started:.0f} s. Report: {self.path('report.md')}")
        return metrics

    def report(self, wall):
        evaluations = {s: json.load(open(self.seed_path(s, "evaluation.json"))) for s in self.seeds}
        keys = ("adherence", "format_validity", "kl_to_start", "win_rate_vs_start")
        models = ["start", *self.methods]
        per_seed = {k: {m: [evaluations[s][m][k] for s in self.seeds] for m in models} for k in keys}
        summary = {k: {m: mean_ci95(v) for m, v in per_seed[k].items()} for k in keys}
        differences = {}
        for a, b in COMPARISONS:
            if a in models and b in models:
                diff = [x - y for x, y in zip(per_seed["adherence"][a], per_seed["adherence"][b])]
                differences[f"{a} - {b}"] = dict(zip(("mean", "ci95"), mean_ci95(diff)))
        metrics = {**{k: {m: v[0] for m, v in summary[k].items()} for k in keys},
                   "ci95": {k: {m: v[1] for m, v in summary[k].items()} for k in keys},
                   "per_seed": per_seed, "adherence_differences": differences, "seeds": self.seeds,
                   "settings": {m: self.settings[m] for m in self.methods}, "steps": self.steps,
                   "sizes": self.size, "wall_time_s": round(wall, 1)}
        bad = [f"{k}.{m}" for k in keys for m, v in metrics[k].items() if not math.isfinite(v)]
        if bad:
            raise SystemExit(f"[tkpo] non-finite metrics: {bad}")
        with open(self.path("metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        fmt = lambda m, h, signed=False: (f"{m:+.3f}" if signed else f"{m:.3f}") + ("" if h != h else f" ± {h:.3f}")  # noqa: E731
        lines = ["# TKPO on the embedded style task", "",
                 f"Seeds {self.seeds}; {self.steps} optimizer steps of {BATCH} examples per method, all from `start`; "
                 f"settings from `{os.path.basename(self.args.settings)}`. Mean ± 95% interval over seeds, test prompts.",
                 "", "| model | adherence | format validity | KL to start | win rate vs start |", "|---|---|---|---|---|"]
        for m in models:
            lines.append(f"| {m} | " + " | ".join(fmt(*summary[k][m], signed=k == "adherence") for k in keys) + " |")
        lines += ["", "| difference in adherence (seed by seed) | mean ± 95% interval | reading |", "|---|---|---|"]
        for name, d in differences.items():
            reading = "interval excludes 0" if d["ci95"] == d["ci95"] and abs(d["mean"]) > d["ci95"] else "not distinguishable"
            lines.append(f"| {name} | {fmt(d['mean'], d['ci95'], True)} | {reading} |")
        lines += ["", "| method | lr | beta |", "|---|---|---|"]
        lines += [f"| {m} | {self.settings[m]['lr']:g} | {self.settings[m].get('beta', '-')} |" for m in self.methods]
        lines += ["", f"Sample answers (seed {self.seeds[0]}):", ""]
        lines += [f"- **{m}**: {json.dumps(t)}" for m in models for t in evaluations[self.seeds[0]][m]["samples"][:2]]
        with open(self.path("report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines[: 8 + len(models) + len(differences) + 3]))
        return metrics

    def run_sweep(self):
        started = time.time()
        self.prepare()
        seed = self.seeds[0]
        name = lambda m, p: f"{m}__" + "_".join(f"{k}{v:g}" for k, v in p.items())  # noqa: E731
        runs = {name(m, p): (m, p) for m in self.methods for p in grid_points(m)}
        self.launch("sweep", [self.policy_job(seed, r, m, p) for r, (m, p) in runs.items()])

        def evaluate():
            with open(self.seed_path(seed, "sweep_evaluation.json"), "w") as f:
                json.dump(self.evaluate_seed(seed, list(runs), "validation"), f, indent=1)
        self.stage("sweep eval", evaluate, self.seed_path(seed, "done", "sweep_evaluation.done"))
        final = json.load(open(self.seed_path(seed, "sweep_evaluation.json")))
        validation = {m: {point_label(p): final[name(m, p)]["gated_adherence"] for p in grid_points(m)}
                      for m in self.methods}
        settings = {m: max(grid_points(m), key=lambda p: final[name(m, p)]["gated_adherence"]) for m in self.methods}
        doc = {"grid": GRID, "objective": "mean adherence on validation prompts, a malformed answer counting -1",
               "seed": seed, "sizes": self.size, "settings": settings, "validation": validation,
               "wall_time_s": round(time.time() - started, 1)}
        with open(self.path("sweep.json"), "w") as f:
            json.dump(doc, f, indent=1)
        for m in self.methods:
            print(f"  {m:<10} best {settings[m]}   " + "  ".join(f"{k}: {v:+.3f}" for k, v in validation[m].items()))


def build_parser():
    p = argparse.ArgumentParser(description="TKPO vs SFT vs DPO on the embedded style task, seeded and tuned (CPU).")
    p.add_argument("--output_dir", default="tkpo_output")
    p.add_argument("--quick", action="store_true", help="reduced sizes and methods (the CI test of the pipeline)")
    p.add_argument("--sweep", action="store_true", help="choose the settings on validation prompts (first seed)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0,1)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--settings", default=SETTINGS_FILE, help="tuned settings (a --sweep's sweep.json)")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks per launch")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    bench = StyleBenchmark(args)
    bench.run_sweep() if args.sweep else bench.run_benchmark()


if __name__ == "__main__":
    main()

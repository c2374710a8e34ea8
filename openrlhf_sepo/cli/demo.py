"""The main job: the whole SePO pipeline on the embedded key-word task, on CPU, in minutes.

``python -m openrlhf_sepo.cli.demo --output_dir demo_output`` (README command 1, ``make demo``):

  data      tiny tokenizer + random tiny Llama + SFT data + preference pairs (oracle / policy / eval splits)
  sft       reference pi_ref          OpenRLHF train_sft                       (2 gloo ranks, ZeRO-2)
  oracle    oracle pi_o               OpenRLHF train_dpo from pi_ref on the oracle split
  scores    token rewards             score_tokens(pi_o, pi_ref) on the policy split
  sepo      SePO policy, k = 0.3      train_sepo from pi_ref, selected tokens only, no reference model
  dpo       baseline, all tokens      OpenRLHF train_dpo from pi_ref (runs the reference model too)
  simpo     baseline, all tokens      train_sepo at k = 1.0 (SimPO's length-normalised loss)
  evaluate  pairwise accuracy on held-out pairs, ground-truth reward of sampled answers, win rate vs SFT,
            the same reward along each training run, and the oracle's selection precision/recall
  report    report.md + PNG plots + the token view of score_report + metrics.json

The three policies share data, steps, batch size and learning rate ("the same budget"). Each stage is
skipped when its output is complete (a ``.done`` marker written last), so a rerun resumes.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import openrlhf_sepo  # noqa: F401  (flash-attn kernel placeholder before OpenRLHF)
from openrlhf_sepo import tiny

# name -> (method, k, nll_loss_coef). The *_nll rows add OpenRLHF's --model.nll_loss_coef (an NLL term on the
# whole chosen response) to the same three methods; the quick sizes (the CI test) train the first three only.
POLICIES = {
    "sepo": ("sepo", 0.3, 0.0),
    "dpo": ("dpo", None, 0.0),
    "simpo": ("sepo", 1.0, 0.0),
    "sepo_nll": ("sepo", 0.3, 1.0),
    "dpo_nll": ("dpo", None, 1.0),
    "simpo_nll": ("sepo", 1.0, 1.0),
}
K_VALUES = (0.1, 0.3, 0.5)

SIZES = {
    # full: README command 1; quick: the CI test of the whole pipeline
    # n_policy is a multiple of the global batch (32), so the final model is the last snapshot's step.
    "full": dict(n_sft=1500, n_oracle=384, n_policy=384, n_eval=100, n_prompts=64, sft_epochs=3,
                 oracle_epochs=2, policy_epochs=2, save_steps=4),
    "quick": dict(n_sft=320, n_oracle=96, n_policy=96, n_eval=32, n_prompts=16, sft_epochs=2,
                  oracle_epochs=2, policy_epochs=1, save_steps=1),
}
COMMON_TRAIN = ["--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
                "--data.max_len", "128", "--train.micro_batch_size", "8", "--train.batch_size", "32",
                "--data.dataloader_num_workers", "0"]
CHAT = ["--data.apply_chat_template"]  # OpenRLHF's raw-data stages; train_sepo reads already tokenized scores


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output_dir)
        self.size = SIZES["quick" if args.quick else "full"]
        self.policies = list(POLICIES)[:3] if args.quick else list(POLICIES)
        self.timings = {}
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)

    # --- plumbing -------------------------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def stage(self, name, fn, done_path):
        """Run ``fn`` unless ``done_path/.done`` exists; record its wall time; print progress."""
        marker = os.path.join(done_path, ".done")
        times = self._load_times()
        if os.path.exists(marker):
            self.timings[name] = times.get(name, 0.0)
            print(f"[demo] {name:<8} skipped (done: {os.path.relpath(done_path, self.out)})", flush=True)
            return
        print(f"[demo] {name:<8} ...", flush=True)
        start = time.time()
        fn()
        self.timings[name] = round(time.time() - start, 1)
        os.makedirs(done_path, exist_ok=True)
        open(marker, "w").close()
        times[name] = self.timings[name]
        with open(self.path("stage_times.json"), "w") as f:
            json.dump(times, f, indent=1)
        print(f"[demo] {name:<8} done in {self.timings[name]:.0f} s", flush=True)

    def _load_times(self):
        try:
            with open(self.path("stage_times.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def launch(self, name, module, args):
        """Run an OpenRLHF-style entrypoint through the CPU runtime with --nproc gloo ranks; log to logs/."""
        from openrlhf_sepo.cpu import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.args.nproc),
               "--master_port", str(free_port()), "-m", "openrlhf_sepo.cpu", module, *args]
        log = self.path("logs", f"{name}.log")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            with open(log) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"[demo] stage {name} failed (exit {proc.returncode}); full log: {log}\n{tail}")

    # --- stages ---------------------------------------------------------------------------------------
    def make_data(self):
        s, seed = self.size, self.args.seed
        tiny.build_tokenizer(self.path("data", "tokenizer"))
        tiny.build_model(self.path("data", "base"), self.path("data", "tokenizer"), self.args.hidden_size, seed=seed)
        tiny.write_sft_data(self.path("data", "sft.jsonl"), s["n_sft"], seed)
        # Disjoint seeds: the oracle never sees the policy's pairs, and evaluation sees neither.
        tiny.write_preference_data(self.path("data", "oracle_pairs.jsonl"), s["n_oracle"], seed + 1)
        tiny.write_preference_data(self.path("data", "policy_pairs.jsonl"), s["n_policy"], seed + 2)
        tiny.write_preference_data(self.path("data", "eval_pairs.jsonl"), s["n_eval"], seed + 3)
        with open(self.path("data", "prompts.jsonl"), "w") as f:
            for row in tiny.make_prompts(s["n_prompts"], seed + 4):
                f.write(json.dumps(row) + "\n")

    def train_sft(self):
        self.launch("sft", "openrlhf.cli.train_sft", [
            "--model.model_name_or_path", self.path("data", "base"),
            "--data.dataset", self.path("data", "sft.jsonl"), "--data.input_key", "messages",
            *COMMON_TRAIN, *CHAT, "--train.max_epochs", str(self.size["sft_epochs"]), "--adam.lr", "3e-3",
            "--ckpt.output_dir", self.path("models", "sft"), "--ckpt.path", self.path("ckpt", "sft"),
        ])

    def train_oracle(self):
        self.launch("oracle", "openrlhf.cli.train_dpo", [
            "--model.model_name_or_path", self.path("models", "sft"),
            "--ref.model_name_or_path", self.path("models", "sft"),
            "--data.dataset", self.path("data", "oracle_pairs.jsonl"), *COMMON_TRAIN, *CHAT,
            "--train.max_epochs", str(self.size["oracle_epochs"]), "--adam.lr", str(self.args.oracle_lr),
            "--model.beta", "0.1",
            "--ckpt.output_dir", self.path("models", "oracle"), "--ckpt.path", self.path("ckpt", "oracle"),
        ])

    def score(self):
        self.launch("scores", "openrlhf_sepo.cli.score_tokens", [
            "--oracle.model_name_or_path", self.path("models", "oracle"),
            "--ref.model_name_or_path", self.path("models", "sft"),
            "--data.dataset", self.path("data", "policy_pairs.jsonl"), "--data.apply_chat_template",
            "--data.max_len", "128", "--output_dir", self.path("scores"), "--overwrite",
            "--k_perc", ",".join(map(str, K_VALUES)),
        ])

    def _policy_flags(self, name):
        # Same data, steps, batch and lr for all three policies; HF snapshots along the way for the curve.
        return [
            "--model.model_name_or_path", self.path("models", "sft"), *COMMON_TRAIN,
            "--train.max_epochs", str(self.size["policy_epochs"]), "--adam.lr", str(self.args.policy_lr),
            "--ckpt.output_dir", self.path("models", name), "--ckpt.path", self.path("ckpt", name),
            "--ckpt.save_steps", str(self.size["save_steps"]), "--ckpt.save_hf", "--ckpt.disable_ds",
            "--logger.tensorboard_dir", self.path("tensorboard", name),
        ]

    def train_policy(self, name):
        method, k, nll = POLICIES[name]
        if method == "sepo":
            module, data = "openrlhf_sepo.cli.train_sepo", [
                "--data.dataset", self.path("scores"), "--sepo.k_chosen", str(k), "--sepo.k_rejected", str(k),
                "--sepo.beta", str(self.args.sepo_beta), "--sepo.gamma", "0.0"]
        else:  # OpenRLHF's DPO on the same pairs, with the reference model
            module, data = "openrlhf.cli.train_dpo", [
                "--ref.model_name_or_path", self.path("models", "sft"), "--data.dataset",
                self.path("data", "policy_pairs.jsonl"), *CHAT, "--model.beta", str(self.args.dpo_beta)]
        self.launch(name, module, [*self._policy_flags(name), *data, "--model.nll_loss_coef", str(nll)])

    def evaluate(self):
        from openrlhf_sepo.cli.evaluate import DataFlags, GenFlags, evaluate_models

        data = DataFlags(dataset=self.path("data", "eval_pairs.jsonl"), apply_chat_template=True, max_len=128)
        gen = GenFlags(prompts=self.path("data", "prompts.jsonl"), n_prompts=self.size["n_prompts"],
                       max_new_tokens=48, greedy=False, temperature=1.0, seed=self.args.seed, n_samples=3)
        models = {"sft": self.path("models", "sft"), "oracle": self.path("models", "oracle")}
        models.update({p: self.path("models", p) for p in self.policies})
        final = evaluate_models(models, baseline="sft", data=data, gen=gen, reward="ground_truth", batch_size=32)

        # Ground-truth reward along training: every HF snapshot, generation only.
        curves = {}
        no_pairs = DataFlags(apply_chat_template=True, max_len=128)
        for policy in self.policies:
            snapshots = {0: self.path("models", "sft")}
            ckpt_dir = self.path("ckpt", policy)
            for entry in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
                if entry.startswith("global_step") and entry.endswith("_hf"):
                    snapshots[int(entry[len("global_step"):-3])] = os.path.join(ckpt_dir, entry)
            final_step = self.size["n_policy"] // 32 * self.size["policy_epochs"]  # global batch 32
            snapshots[final_step] = self.path("models", policy)
            result = evaluate_models({f"step{s}": p for s, p in sorted(snapshots.items())}, data=no_pairs,
                                     gen=gen, reward="ground_truth", batch_size=32)
            curves[policy] = {int(name[4:]): m["reward_mean"] for name, m in result["models"].items()}
        with open(self.path("evaluation.json"), "w") as f:
            json.dump({"final": final, "curves": curves}, f, indent=1)

    # --- report ---------------------------------------------------------------------------------------
    def selection_quality(self, rows):
        """Precision / recall of the oracle's selected tokens against the planted key tokens, per k."""
        import torch
        from transformers import AutoTokenizer

        from openrlhf_sepo.scoring import select_key_tokens

        tok = AutoTokenizer.from_pretrained(self.path("models", "sft"))
        hits = {k: 0 for k in K_VALUES}
        selected = {k: 0 for k in K_VALUES}
        n_key = n_tokens = 0
        for row in rows:
            for side, largest in (("chosen", True), ("rejected", False)):
                response = row[f"{side}_input_ids"][row["prompt_len"]:]
                key = torch.tensor(tiny.key_token_mask(tok.convert_ids_to_tokens(response)))
                scores = torch.tensor(row[f"{side}_scores"])
                n_key += int(key.sum())
                n_tokens += len(response)
                for k in K_VALUES:
                    mask = select_key_tokens(scores, k, largest=largest)
                    hits[k] += int((mask & key).sum())
                    selected[k] += int(mask.sum())
        return {
            "precision": {str(k): hits[k] / selected[k] for k in K_VALUES},
            "recall": {str(k): hits[k] / n_key for k in K_VALUES},
            "base_rate": n_key / n_tokens,
            "n_response_tokens": n_tokens,
        }

    def training_tokens(self, rows):
        """Per policy, the response tokens whose log-probs enter its loss, summed over epochs; and the prompt +
        response tokens through the policy (for its throughput). An NLL term reads every chosen-response token."""
        from openrlhf_sepo.scoring import num_selected

        count = dict(chosen=0, rejected=0, chosen_selected=0, rejected_selected=0, sequence=0)
        for row in rows:
            for side in ("chosen", "rejected"):
                n = len(row[f"{side}_scores"])
                count[side] += n
                count[f"{side}_selected"] += num_selected(n, 0.3)
                count["sequence"] += len(row[f"{side}_input_ids"])
        tokens = {}
        for name in self.policies:
            method, k, nll = POLICIES[name]
            selective = method == "sepo" and k < 1.0
            chosen = count["chosen"] if nll or not selective else count["chosen_selected"]
            rejected = count["rejected_selected"] if selective else count["rejected"]
            tokens[name] = (chosen + rejected) * self.size["policy_epochs"]
        return tokens, count["sequence"] * self.size["policy_epochs"]

    def report(self):
        from datasets import load_dataset

        with open(self.path("evaluation.json")) as f:
            evaluation = json.load(f)
        final, curves = evaluation["final"]["models"], evaluation["curves"]
        scored = load_dataset("parquet", data_dir=self.path("scores", "data"), split="train")  # the policy split
        selection = self.selection_quality(scored)
        tokens, sequence_tokens = self.training_tokens(scored)
        times = self._load_times()

        subprocess.run([sys.executable, "-m", "openrlhf_sepo.cli.score_report", self.path("scores"),
                        "--out", self.path("report"), "--k", "0.3"], check=True, stdout=subprocess.DEVNULL)
        self._plots(curves, selection)

        metrics = {
            "selection_precision": selection["precision"],
            "selection_recall": selection["recall"],
            "key_token_base_rate": selection["base_rate"],
            "ground_truth_reward": {m: final[m]["reward_mean"] for m in final},
            "win_rate_vs_sft": {m: final[m]["win_rate_vs_sft"] for m in final},
            "pairwise_accuracy": {m: final[m]["pairwise_accuracy"] for m in final},
            "training_tokens": tokens,
            "wall_time_s": times,
        }
        with open(self.path("metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)

        lines = [
            "# SePO demo report", "",
            "Embedded key-word task: a preference pair differs only in its key words "
            f"(base rate {selection['base_rate']:.1%} of response tokens), so token-level truth is known.", "",
            "## Models", "",
            "| model | ground-truth reward | win rate vs SFT | pairwise accuracy | training tokens | "
            "wall time (s) | policy tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in ("sft", "oracle", *self.policies):
            wall = times.get(m, times.get("oracle") if m == "oracle" else None)
            tok = tokens.get(m)
            tps = f"{sequence_tokens / wall:.0f}" if m in POLICIES and wall else "-"
            lines.append(
                f"| {m} | {final[m]['reward_mean']:+.3f} | {final[m]['win_rate_vs_sft']:.3f} | "
                f"{final[m]['pairwise_accuracy']:.3f} | {tok if tok is not None else '-'} | "
                f"{wall if wall is not None else '-'} | {tps} |"
            )
        lines += [
            "", "All policies start from the SFT model and share data, steps, batch size and learning rate. "
            "`*_nll` rows add OpenRLHF's `--model.nll_loss_coef 1` (NLL of the whole chosen response) to the same "
            "method. Training tokens: response tokens whose log-probs enter the loss (SePO: the k = 0.3 selection, "
            "plus the chosen response with NLL; DPO and SimPO: all). Policy tokens/s: prompt + response tokens "
            "through the policy per second of stage wall time (2 CPU ranks; DPO also runs its reference model).", "",
            "## Oracle token selection against the planted key tokens", "",
            "| k | precision | recall | base rate |", "|---|---|---|---|",
        ]
        for k in K_VALUES:
            lines.append(f"| {k} | {selection['precision'][str(k)]:.3f} | {selection['recall'][str(k)]:.3f} | "
                         f"{selection['base_rate']:.3f} |")
        lines += [
            "", "![selection](selection.png)", "",
            "## Ground-truth reward during training", "", "![reward curve](reward_curve.png)", "",
            "## Token scores", "",
            "[Token view](report/index.html): each token shaded by its oracle reward, the tokens selected at "
            "k = 0.3 marked.", "", "![token scores](report/scores.png)", "",
            "## Stage wall times (s)", "",
            "| stage | seconds |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in times.items()],
            "", "## Sample generations", "",
        ]
        for m in ("sft", *self.policies):
            for sample in final[m].get("samples", [])[:2]:
                text = sample.get("response", sample) if isinstance(sample, dict) else sample
                lines.append(f"- **{m}**: {json.dumps(text)}")
        with open(self.path("report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _plots(self, curves, selection):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        colors = {"sepo": "tab:green", "dpo": "tab:blue", "simpo": "tab:orange"}
        for policy, curve in curves.items():
            steps = sorted(curve, key=int)
            ax.plot([int(s) for s in steps], [curve[s] for s in steps], marker="o", label=policy,
                    color=colors[policy.removesuffix("_nll")], linestyle="--" if policy.endswith("_nll") else "-")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("ground-truth reward (sampled)")
        ax.set_title("Alignment during training (same data, steps and lr)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path("reward_curve.png"), dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.6))
        ks = [str(k) for k in K_VALUES]
        x = range(len(ks))
        ax.bar([i - 0.2 for i in x], [selection["precision"][k] for k in ks], width=0.4, label="precision")
        ax.bar([i + 0.2 for i in x], [selection["recall"][k] for k in ks], width=0.4, label="recall")
        ax.axhline(selection["base_rate"], color="black", linestyle="--", label="key-token base rate")
        ax.set_xticks(list(x), [f"k={k}" for k in ks])
        ax.set_ylim(0, 1)
        ax.set_title("Oracle-selected tokens vs planted key tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path("selection.png"), dpi=120)
        plt.close(fig)

    def run(self):
        start = time.time()
        self.stage("data", self.make_data, self.path("data"))
        self.stage("sft", self.train_sft, self.path("models", "sft"))
        self.stage("oracle", self.train_oracle, self.path("models", "oracle"))
        self.stage("scores", self.score, self.path("scores"))
        for name in self.policies:
            self.stage(name, lambda name=name: self.train_policy(name), self.path("models", name))
        self.stage("evaluate", self.evaluate, self.path("eval_done"))
        print("[demo] report   ...", flush=True)
        self.report()
        with open(self.path("metrics.json")) as f:
            metrics = json.load(f)
        bad = [k for k, v in _flatten(metrics).items() if not math.isfinite(v)]
        if bad:
            raise SystemExit(f"[demo] non-finite metrics: {bad}")
        print(f"[demo] finished in {time.time() - start:.0f} s. Report: {self.path('report.md')}")
        with open(self.path("report.md")) as f:
            print("".join(f.readlines()[:20]))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


def build_parser():
    p = argparse.ArgumentParser(description="Run the whole SePO pipeline on the embedded key-word task (CPU).")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--quick", action="store_true", help="reduced sizes (the CI test of the whole pipeline)")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks per training stage")
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--oracle_lr", type=float, default=1e-4,
                   help="DPO learning rate of the oracle: gentle, so that its token rewards stay local")
    p.add_argument("--policy_lr", type=float, default=1e-3, help="learning rate of all three policies")
    p.add_argument("--sepo_beta", type=float, default=2.0, help="--sepo.beta of SePO and SimPO")
    p.add_argument("--dpo_beta", type=float, default=0.1, help="--model.beta of the DPO baseline")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    Demo(build_parser().parse_args(argv)).run()


if __name__ == "__main__":
    main()

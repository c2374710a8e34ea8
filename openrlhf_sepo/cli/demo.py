"""The main job: a seeded, tuned comparison of SePO with DPO and SimPO on the embedded key-word task (CPU).

``python -m openrlhf_sepo.cli.demo --output_dir demo_output`` (README command 1, ``make demo``) trains and
evaluates every method of ``METHODS`` at its tuned setting (``demo_settings.json``) on each seed of ``--seeds``;
``--sweep`` re-derives those settings on the validation prompts instead (docs/benchmark.md says how).

Per seed everything is redrawn: data, base-model initialisation, SFT, oracle, token scores and policies.

  data      tokenizer (trained locally), a weak tiny Llama (hidden 64, 2 layers) and a strong one (hidden 128,
            4 layers), SFT rows, preference pairs of the task variant (oracle / policy / eval splits, disjoint
            seeds), validation and test prompts (topics disjoint from each other and from all training rows)
  stage 1   one launch, all seeds: sft and strong_sft (OpenRLHF train_sft), oracle (train_dpo from sft),
            scores (score_tokens: oracle vs sft on the policy split)
  truth     a scores dir whose scores are the planted key tokens (the truth-selection control)
  stage 2   one launch, all seeds: every policy of METHODS (train_sepo or OpenRLHF train_dpo)
  evaluate  test prompts: ground-truth reward, format validity, KL to the policy's SFT model, win rate vs it;
            held-out pairs: pairwise accuracy; every training snapshot (for the curves and the frontier)
  report    report.md, metrics.json, frontier.png, reward_curve.png, selection.png, report/ (token view)

A launch runs its jobs through ``python -m openrlhf_sepo.cpu --jobs`` (one process start per launch, not per
job). Every job and stage is skipped when its output is complete, so a rerun resumes.
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

# Each method: which trainer, which token scores and selection, which SFT model it starts from.
# sepo is this package's default SePO: the published selection and loss plus OpenRLHF's NLL term on the chosen
# response (what the sweep showed keeps the answer format); sepo_paper is the published method (no NLL). The
# *_exclude_prefix rows never select the pair's common prefix. The controls sepo_random / sepo_truth differ from
# sepo in the selection alone. simpo is SimPO (all tokens); *_nll add the same NLL term to DPO / SimPO; w2s_*:
# the strong policy trained from the weak oracle's scores (SePO) or on the same pairs (DPO, SimPO).
# The learned token reward model (token_rm, trained on the oracle's pairs, from the SFT model): sepo_token_rm is SePO
# with its scores in place of the oracle's; wmle is its own objective, reward-weighted MLE on the chosen answers of
# the policy pairs; wmle_onpolicy alternates as the method does (sample from the policy, rank by the task's truth,
# retrain the token RM, train the policy), in LOOP_ROUNDS rounds over the same step budget; sft_chosen (plain MLE on
# the same chosen answers, OpenRLHF's train_sft) is the control for the weighting.
_SEPO = dict(trainer="sepo", scores="oracle", k=0.3, selection="per_response", exclude_prefix=False, nll=1.0,
             policy="weak")
_DPO = dict(trainer="dpo", nll=0.0, policy="weak")
_SIMPO = dict(_SEPO, k=1.0, nll=0.0)
_WMLE = dict(trainer="wmle", scores="token_rm", nll=0.0, policy="weak")
METHODS = {
    "sepo": _SEPO,
    "sepo_exclude_prefix": dict(_SEPO, exclude_prefix=True),
    "sepo_paper": dict(_SEPO, nll=0.0),
    "sepo_paper_exclude_prefix": dict(_SEPO, nll=0.0, exclude_prefix=True),
    "sepo_random": dict(_SEPO, selection="random"),
    "sepo_truth": dict(_SEPO, scores="truth"),
    "dpo": _DPO,
    "simpo": _SIMPO,
    "dpo_nll": dict(_DPO, nll=1.0),
    "simpo_nll": dict(_SIMPO, nll=1.0),
    "w2s_sepo": dict(_SEPO, policy="strong"),
    "w2s_dpo_nll": dict(_DPO, nll=1.0, policy="strong"),
    "w2s_simpo_nll": dict(_SIMPO, nll=1.0, policy="strong"),
    # The strong policy from a weak oracle of ANOTHER tokenizer (a BPE of 300 tokens, not the policy's 512):
    # score_tokens --policy.tokenizer maps the oracle's token rewards onto the policy's tokens.
    "w2s_x_sepo": dict(_SEPO, scores="oracle_x", policy="strong"),
    "sepo_token_rm": dict(_SEPO, scores="token_rm"),
    "wmle": _WMLE,
    "wmle_onpolicy": dict(_WMLE, trainer="wmle_loop"),
    "sft_chosen": dict(trainer="sft", nll=0.0, policy="weak"),
}
BETA_TRAINERS = {"sepo": "--sepo.beta", "dpo": "--model.beta"}  # the other trainers have no beta
LOOP_ROUNDS, LOOP_SAMPLES = 2, 4  # wmle_onpolicy: rounds, answers sampled per training prompt and round
# Each method's "scores" -> the seed's scores dir it trains from (and selection_stats reads).
SCORES_DIRS = {"oracle": "scores", "truth": "scores_truth", "token_rm": "scores_token_rm", "oracle_x": "scores_x"}
X_VOCAB = 300  # the cross-tokenizer oracle's BPE vocabulary (the policy's: 512)
TOKEN_RM_LR = 1e-3  # the token RM's learning rate, fixed as the oracle's is (it is a scorer, not a tuned policy)
QUICK_METHODS = ["sepo", "sepo_random", "sepo_truth", "dpo_nll", "simpo", "w2s_sepo", "sepo_token_rm", "wmle",
                 "wmle_onpolicy"]
GRID = {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "sepo_beta": [1.0, 2.5], "dpo_beta": [0.1, 0.5]}
OBJECTIVE = ("mean over validation samples of the ground-truth reward, a malformed answer (not "
             "tiny.is_well_formed) counting as -1")
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_settings.json")
K_VALUES = (0.1, 0.3, 0.5)
MODELS = {"weak": dict(hidden_size=64, num_layers=2), "strong": dict(hidden_size=128, num_layers=4)}

SIZES = {
    # full: README command 1; quick: the CI test of the whole pipeline. n_policy is a multiple of the global
    # batch (32), so the last snapshot is the final model; snapshots every save_steps optimizer steps.
    "full": dict(n_sft=1500, n_oracle=384, n_policy=384, n_eval=100, n_prompts=64, sft_epochs=3,
                 oracle_epochs=2, policy_epochs=2, save_steps=8),
    "quick": dict(n_sft=800, n_oracle=96, n_policy=96, n_eval=32, n_prompts=16, sft_epochs=3,
                  oracle_epochs=2, policy_epochs=2, save_steps=3),
}
BATCH = 32
COMMON_TRAIN = ["--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
                "--data.max_len", "128", "--train.micro_batch_size", "8", "--train.batch_size", str(BATCH),
                "--data.dataloader_num_workers", "0"]
CHAT = ["--data.apply_chat_template"]  # OpenRLHF's raw-data stages; train_sepo reads already tokenized scores
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci95(values):
    """(mean, half-width of the 95% Student-t interval of the mean) of per-seed values; half-width NaN for one."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def gated_reward(samples) -> float:
    """The tuning objective (``OBJECTIVE``): ground truth of well-formed answers, -1 for malformed ones."""
    return sum(s["reward"] if s["well_formed"] else -1.0 for s in samples) / len(samples)


def setting_flags(method: str, setting: dict) -> list:
    """The command-line flags of one grid point: learning rate, and the method's beta if its trainer has one."""
    beta = BETA_TRAINERS.get(METHODS[method]["trainer"].removesuffix("_loop"))
    return ["--adam.lr", str(setting["lr"]), *([beta, str(setting["beta"])] if beta else [])]


def grid_points(method: str):
    """The grid of ``method``: lr x its beta (SePO/SimPO or DPO betas), or lr alone for a trainer without beta."""
    trainer = METHODS[method]["trainer"]
    if trainer not in BETA_TRAINERS:
        return [{"lr": lr} for lr in GRID["lr"]]
    betas = GRID["dpo_beta"] if trainer == "dpo" else GRID["sepo_beta"]
    return [{"lr": lr, "beta": beta} for lr in GRID["lr"] for beta in betas]


def loop_metric(text: str) -> float:
    """wmle_onpolicy's ranking metric of a sampled answer: the ground truth of a well-formed answer (in [-1, 1]), and
    ground truth - 2.5 (in [-3.5, -1.5]) of a malformed one: format first, then the key words. (The gated reward's
    flat -1 for every malformed answer left most lists of a weak SFT model's samples all tied.)"""
    return tiny.ground_truth_reward(text) - (0.0 if tiny.is_well_formed(text) else 2.5)


def point_label(point: dict) -> str:
    """A grid point's name: ``lr=0.001,beta=1`` (or ``lr=0.001`` without beta)."""
    return ",".join(f"{k}={v:g}" for k, v in point.items())


class Demo:
    """The benchmark: its methods, sizes and the launch / stage / resume plumbing (``tkpo_benchmark`` reuses it with
    its own class attributes)."""

    METHODS, QUICK_METHODS, SIZES = METHODS, QUICK_METHODS, SIZES

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output_dir)
        self.size = self.SIZES["quick" if args.quick else "full"]
        self.methods = [m.strip() for m in args.methods.split(",")] if args.methods else (
            self.QUICK_METHODS if args.quick else list(self.METHODS))
        unknown = [m for m in self.methods if m not in self.METHODS]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(self.METHODS)}")
        self.seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
        if args.sweep:
            self.seeds = self.seeds[:1]
        elif len(self.seeds) < 2:
            raise SystemExit("--seeds: give at least 2 seeds (3 or more for an interval worth reading)")
        if not args.sweep:
            self.settings = self._load_settings(args.settings)
        self.steps = self.size["n_policy"] // BATCH * self.size["policy_epochs"]
        self.cross_tokenizer = any(self.METHODS[m].get("scores") == "oracle_x" for m in self.methods)
        os.makedirs(self.out, exist_ok=True)

    def _load_settings(self, path):
        try:
            with open(path) as f:
                settings = json.load(f)["settings"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise SystemExit(f"--settings: cannot read tuned settings from {path!r}: {e}") from None
        missing = [m for m in self.methods if m not in settings]
        if missing:
            raise SystemExit(f"--settings {path}: no setting for {missing}; run --sweep for them")
        return settings

    # --- plumbing -------------------------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def seed_path(self, seed, *parts):
        return self.path(f"seed{seed}", *parts)

    def stage(self, name, fn, marker):
        """Run ``fn`` unless ``marker`` exists; write the wall seconds into it; print progress."""
        if os.path.exists(marker):
            print(f"[demo] {name:<10} skipped (done)", flush=True)
            return
        print(f"[demo] {name:<10} ...", flush=True)
        start = time.time()
        fn()
        seconds = round(time.time() - start, 1)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"{seconds}\n")
        print(f"[demo] {name:<10} done in {seconds:.0f} s", flush=True)

    def launch(self, name, jobs):
        """Run ``jobs`` (name, module, args, done marker, log) in one torchrun launch of --nproc gloo ranks."""
        from openrlhf_sepo.cpu import free_port

        todo = [j for j in jobs if not os.path.exists(j["done"])]
        print(f"[demo] {name:<10} {len(todo)} of {len(jobs)} jobs to run", flush=True)
        if not todo:
            return
        jobs_file = self.path("logs", f"{name}_jobs.json")
        os.makedirs(os.path.dirname(jobs_file), exist_ok=True)
        with open(jobs_file, "w") as f:
            json.dump(todo, f, indent=1)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.args.nproc),
               "--master_port", str(free_port()), "-m", "openrlhf_sepo.cpu", "--jobs", jobs_file]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        start, log = time.time(), self.path("logs", f"{name}.log")
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
            for line in proc.stdout:  # the jobs' own output goes to their logs; the runner's lines are echoed
                f.write(line)
                if line.startswith("[jobs]"):
                    print(f"[demo]   {line[7:].rstrip()}", flush=True)
            proc.wait()
        if proc.returncode != 0:
            failed = next((j for j in todo if not os.path.exists(j["done"])), None)
            where = failed["log"] if failed and os.path.exists(failed["log"]) else log
            with open(where) as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"[demo] launch {name} failed (exit {proc.returncode}) at job "
                             f"{failed['name'] if failed else '?'}; log: {where}\n{tail}")
        print(f"[demo] {name:<10} {len(todo)} jobs in {time.time() - start:.0f} s", flush=True)

    def job(self, seed, name, module, args):
        return {"name": f"seed{seed}/{name}", "module": module, "args": args,
                "done": self.seed_path(seed, "done", f"{name}.done"), "log": self.seed_path(seed, "logs", f"{name}.log")}

    # --- data and stage 1 -----------------------------------------------------------------------------
    def make_data(self, seed):
        s, d = self.size, lambda *p: self.seed_path(seed, "data", *p)
        tiny.build_tokenizer(d("tokenizer"))
        for name, shape in MODELS.items():
            tiny.build_model(d(f"base_{name}"), d("tokenizer"), shape["hidden_size"], shape["num_layers"], seed=seed)
        if self.cross_tokenizer:  # the other tokenizer and a weak model on it, for the oracle_x / sft_x pair
            tiny.build_tokenizer(d("tokenizer_x"), X_VOCAB)
            tiny.build_model(d("base_weak_x"), d("tokenizer_x"), **MODELS["weak"], seed=seed)
        tiny.write_sft_data(d("sft.jsonl"), s["n_sft"], seed)
        # Disjoint seeds: the oracle never sees the policy's pairs, and evaluation sees neither.
        task = dict(variant=self.args.task, label_noise=self.args.label_noise)
        ood = self.args.ood  # the oracle's pairs from one slice of topics and filler words, the policy's from the other
        tiny.write_preference_data(d("oracle_pairs.jsonl"), s["n_oracle"], 1000 * seed + 1, **task,
                                   ood_slice="oracle" if ood else None)
        tiny.write_preference_data(d("policy_pairs.jsonl"), s["n_policy"], 1000 * seed + 2, **task,
                                   ood_slice="policy" if ood else None)
        with open(d("policy_pairs.jsonl")) as f, open(d("policy_chosen.jsonl"), "w") as out:  # sft_chosen's data
            for line in f:
                out.write(json.dumps({"messages": json.loads(line)["chosen"]}) + "\n")
        tiny.write_preference_data(d("eval_pairs.jsonl"), s["n_eval"], 1000 * seed + 3, variant=self.args.task)
        for split in ("validation", "test"):
            with open(d(f"{split}_prompts.jsonl"), "w") as f:
                for row in tiny.make_prompts(s["n_prompts"], 1000 * seed + 4, split=split):
                    f.write(json.dumps(row) + "\n")

    def stage1_jobs(self, seed):
        m, d = lambda *p: self.seed_path(seed, "models", *p), lambda *p: self.seed_path(seed, "data", *p)
        seed_flag = ["--train.seed", str(seed)]
        jobs = []
        for sft, base in (("sft", "base_weak"), ("strong_sft", "base_strong")):
            if sft == "strong_sft" and not any(METHODS[x]["policy"] == "strong" for x in self.methods):
                continue
            jobs.append(self.job(seed, sft, "openrlhf.cli.train_sft", [
                "--model.model_name_or_path", d(base), "--data.dataset", d("sft.jsonl"), "--data.input_key",
                "messages", *COMMON_TRAIN, *CHAT, "--train.max_epochs", str(self.size["sft_epochs"]),
                "--adam.lr", "3e-3", "--ckpt.output_dir", m(sft), "--ckpt.path", self.seed_path(seed, "ckpt", sft),
                *seed_flag]))
        jobs.append(self.job(seed, "oracle", "openrlhf.cli.train_dpo", [
            "--model.model_name_or_path", m("sft"), "--ref.model_name_or_path", m("sft"),
            "--data.dataset", d("oracle_pairs.jsonl"), *COMMON_TRAIN, *CHAT,
            "--train.max_epochs", str(self.size["oracle_epochs"]), "--adam.lr", str(self.args.oracle_lr),
            "--model.beta", "0.1", "--ckpt.output_dir", m("oracle"), "--ckpt.path", self.seed_path(seed, "ckpt", "oracle"),
            *seed_flag]))
        if any(METHODS[x].get("scores") == "token_rm" for x in self.methods):
            # The token RM learns from the oracle's pairs (lists of two), from the SFT model, and scores the policy's.
            jobs.append(self.job(seed, "token_rm", "openrlhf_sepo.cli.train_token_rm", [
                "--model.model_name_or_path", m("sft"), "--data.dataset", d("oracle_pairs.jsonl"), *COMMON_TRAIN,
                *CHAT, "--train.max_epochs", str(self.size["oracle_epochs"]), "--adam.lr", str(TOKEN_RM_LR),
                "--ckpt.output_dir", m("token_rm"), "--ckpt.path", self.seed_path(seed, "ckpt", "token_rm"),
                *seed_flag]))
            jobs.append(self.job(seed, "scores_token_rm", "openrlhf_sepo.cli.score_tokens", [
                "--scorer", "token_rm", "--token_rm.model_name_or_path", m("token_rm"),
                "--data.dataset", d("policy_pairs.jsonl"), "--data.apply_chat_template", "--data.max_len", "128",
                "--output_dir", self.seed_path(seed, "scores_token_rm"), "--overwrite",
                "--k_perc", ",".join(map(str, K_VALUES))]))
        if self.cross_tokenizer:
            jobs.append(self.job(seed, "sft_x", "openrlhf.cli.train_sft", [
                "--model.model_name_or_path", d("base_weak_x"), "--data.dataset", d("sft.jsonl"), "--data.input_key",
                "messages", *COMMON_TRAIN, *CHAT, "--train.max_epochs", str(self.size["sft_epochs"]),
                "--adam.lr", "3e-3", "--ckpt.output_dir", m("sft_x"), "--ckpt.path", self.seed_path(seed, "ckpt", "sft_x"),
                *seed_flag]))
            jobs.append(self.job(seed, "oracle_x", "openrlhf.cli.train_dpo", [
                "--model.model_name_or_path", m("sft_x"), "--ref.model_name_or_path", m("sft_x"),
                "--data.dataset", d("oracle_pairs.jsonl"), *COMMON_TRAIN, *CHAT,
                "--train.max_epochs", str(self.size["oracle_epochs"]), "--adam.lr", str(self.args.oracle_lr),
                "--model.beta", "0.1", "--ckpt.output_dir", m("oracle_x"),
                "--ckpt.path", self.seed_path(seed, "ckpt", "oracle_x"), *seed_flag]))
            jobs.append(self.job(seed, "scores_x", "openrlhf_sepo.cli.score_tokens", [
                "--oracle.model_name_or_path", m("oracle_x"), "--ref.model_name_or_path", m("sft_x"),
                "--policy.tokenizer", d("tokenizer"), "--data.dataset", d("policy_pairs.jsonl"),
                "--data.apply_chat_template", "--data.max_len", "128", "--output_dir", self.seed_path(seed, "scores_x"),
                "--overwrite", "--k_perc", ",".join(map(str, K_VALUES))]))
        jobs.append(self.job(seed, "scores", "openrlhf_sepo.cli.score_tokens", [
            "--oracle.model_name_or_path", m("oracle"), "--ref.model_name_or_path", m("sft"),
            "--data.dataset", d("policy_pairs.jsonl"), "--data.apply_chat_template", "--data.max_len", "128",
            "--output_dir", self.seed_path(seed, "scores"), "--overwrite", "--k_perc", ",".join(map(str, K_VALUES))]))
        return jobs

    def write_truth_scores(self, seed):
        """The truth control's scores dir: the oracle's scores dir with each score replaced by the task's true token
        reward, ``tiny.key_token_signs`` (+1 on a good key word, -1 on a bad one, 0 elsewhere), so that selection
        keeps good key tokens of chosen and bad ones of rejected first; same ids, manifest and flags, so it trains
        exactly like SePO."""
        import shutil

        import pyarrow as pa
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        src, dst = self.seed_path(seed, "scores"), self.seed_path(seed, "scores_truth")
        tok = AutoTokenizer.from_pretrained(self.seed_path(seed, "models", "sft"))
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(os.path.join(dst, "data"))
        for name in sorted(os.listdir(os.path.join(src, "data"))):
            table = pq.read_table(os.path.join(src, "data", name))
            rows = table.to_pylist()
            for row in rows:
                for side in ("chosen", "rejected"):
                    pieces = tok.convert_ids_to_tokens(row[f"{side}_input_ids"][row["prompt_len"]:])
                    row[f"{side}_scores"] = [float(x) for x in tiny.key_token_signs(pieces)]
            pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), os.path.join(dst, "data", name))
        shutil.copy(os.path.join(src, "manifest.json"), os.path.join(dst, "manifest.json"))

    # --- stage 2: policies ----------------------------------------------------------------------------
    def policy_job(self, seed, name, method, setting, snapshots, init=None, scores=None, epochs=None):
        """The training job of one policy run; ``init`` / ``scores`` / ``epochs`` override the method's start model,
        scores dir and epochs (wmle_onpolicy's rounds)."""
        spec = METHODS[method]
        m, d = lambda *p: self.seed_path(seed, "models", *p), lambda *p: self.seed_path(seed, "data", *p)
        init = init or m("sft" if spec["policy"] == "weak" else "strong_sft")
        scores = scores or self.seed_path(seed, SCORES_DIRS.get(spec.get("scores"), ""))
        args = ["--model.model_name_or_path", init, *COMMON_TRAIN, "--train.max_epochs",
                str(epochs or self.size["policy_epochs"]), "--train.seed", str(seed), *setting_flags(method, setting),
                "--ckpt.output_dir", m(name), "--ckpt.path", self.seed_path(seed, "ckpt", name)]
        if snapshots:
            args += ["--ckpt.save_steps", str(self.size["save_steps"]), "--ckpt.save_hf", "--ckpt.disable_ds"]
        if spec["trainer"] in ("wmle", "wmle_loop"):
            args += ["--data.dataset", scores, "--wmle.side", "chosen", "--wmle.weight", "reward"]
            return self.job(seed, name, "openrlhf_sepo.cli.train_wmle", args)
        if spec["trainer"] == "sft":
            args += ["--data.dataset", d("policy_chosen.jsonl"), "--data.input_key", "messages", *CHAT]
            return self.job(seed, name, "openrlhf.cli.train_sft", args)
        args += ["--model.nll_loss_coef", str(spec["nll"])]
        if spec["trainer"] == "sepo":
            args += ["--data.dataset", scores, "--sepo.k_chosen", str(spec["k"]), "--sepo.k_rejected",
                     str(spec["k"]), "--sepo.selection", spec["selection"], "--sepo.gamma", "0.0"]
            args += ["--sepo.exclude_common_prefix"] if spec["exclude_prefix"] else []
            return self.job(seed, name, "openrlhf_sepo.cli.train_sepo", args)
        args += ["--ref.model_name_or_path", init, "--data.dataset", d("policy_pairs.jsonl"), *CHAT]
        return self.job(seed, name, "openrlhf.cli.train_dpo", args)

    def run_loops(self, runs, snapshots):
        """wmle_onpolicy runs (``runs``: {name: (method, setting)}), LOOP_ROUNDS rounds on every seed, one launch per
        round. Round r: the round's policy (the SFT model first) samples LOOP_SAMPLES answers to each of n_policy
        training prompts; each list is ranked by ``loop_metric`` (format first, then ground truth); the token RM
        continues training on those lists (from the pair-trained token_rm); it scores
        the policy pairs; the policy continues with train_wmle for policy_epochs / LOOP_ROUNDS epochs. The last
        round's policy is models/NAME, so evaluation reads it like any other run."""
        from openrlhf_sepo.cli.evaluate import DataFlags, GenFlags, generate, load_policy

        epochs, rest = divmod(self.size["policy_epochs"], LOOP_ROUNDS)
        assert rest == 0, "policy_epochs must be a multiple of LOOP_ROUNDS (the same step budget, whole epochs)"
        n_prompts = self.size["n_policy"]
        for r in range(1, LOOP_ROUNDS + 1):
            jobs = []
            for seed in self.seeds:
                for name, (method, setting) in runs.items():
                    m = lambda *p: self.seed_path(seed, "models", *p)  # noqa: E731
                    tag, prev = f"{name}_r{r}", (f"{name}_r{r - 1}" if r > 1 else None)
                    policy_in = m(prev) if prev else m("sft")
                    lists = self.seed_path(seed, "data", f"{tag}_lists.jsonl")

                    def sample(seed=seed, policy_in=policy_in, lists=lists):
                        model, tok = load_policy(policy_in)
                        prompts = [row["prompt"] for row in tiny.make_prompts(n_prompts, 1000 * seed + 5 + r, "train")]
                        answers = [generate(model, tok, prompts, DataFlags(apply_chat_template=True, max_len=128),
                                            GenFlags(max_new_tokens=48, temperature=1.0, top_p=1.0, seed=seed * 100 + r * 10 + i),
                                            batch_size=64) for i in range(LOOP_SAMPLES)]
                        with open(lists, "w") as f:
                            for j, prompt in enumerate(prompts):
                                responses = [a[j] for a in answers]
                                scores = [loop_metric(t) for t in responses]
                                f.write(json.dumps({"prompt": prompt, "responses": responses, "scores": scores}) + "\n")
                    self.stage(f"sample {tag} s{seed}", sample, self.seed_path(seed, "done", f"{tag}_lists.done"))
                    rm_in = m(f"{prev}_token_rm") if prev else m("token_rm")
                    jobs.append(self.job(seed, f"{tag}_token_rm", "openrlhf_sepo.cli.train_token_rm", [
                        "--model.model_name_or_path", rm_in, "--data.dataset", lists, "--data.prompt_key", "prompt",
                        *COMMON_TRAIN, *CHAT, "--train.max_epochs", "1", "--adam.lr", str(TOKEN_RM_LR),
                        "--ckpt.output_dir", m(f"{tag}_token_rm"),
                        "--ckpt.path", self.seed_path(seed, "ckpt", f"{tag}_token_rm"), "--train.seed", str(seed)]))
                    scores = self.seed_path(seed, f"scores_{tag}")
                    jobs.append(self.job(seed, f"{tag}_scores", "openrlhf_sepo.cli.score_tokens", [
                        "--scorer", "token_rm", "--token_rm.model_name_or_path", m(f"{tag}_token_rm"),
                        "--data.dataset", self.seed_path(seed, "data", "policy_pairs.jsonl"),
                        "--data.apply_chat_template", "--data.max_len", "128", "--output_dir", scores, "--overwrite"]))
                    out = name if r == LOOP_ROUNDS else tag
                    jobs.append(self.policy_job(seed, out, method, setting, snapshots and r == LOOP_ROUNDS,
                                                init=policy_in, scores=scores, epochs=epochs))
            self.launch(f"loop_r{r}", jobs)

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate_seed(self, seed, runs, prompts, snapshots):
        """{run: metrics} for ``runs`` ({name: method}) on ``prompts`` (validation or test), each family against
        its own SFT model; with ``snapshots``, also every saved training step (``curves``: run -> step -> metrics)."""
        from openrlhf_sepo.cli.evaluate import DataFlags, GenFlags, evaluate_models

        p = lambda *x: self.seed_path(seed, *x)  # noqa: E731
        n = self.size["n_prompts"]
        data = DataFlags(dataset=p("data", "eval_pairs.jsonl"), apply_chat_template=True, max_len=128)
        gen = GenFlags(prompts=p("data", f"{prompts}_prompts.jsonl"), n_prompts=n, max_new_tokens=48,
                       temperature=1.0, top_p=1.0, seed=seed, n_samples=n)
        no_pairs = DataFlags(apply_chat_template=True, max_len=128)
        final, curves = {}, {}
        for family, sft in (("weak", "sft"), ("strong", "strong_sft")):
            names = [r for r, method in runs.items() if METHODS[method]["policy"] == family]
            if not names:
                continue
            models = {sft: p("models", sft), **({"oracle": p("models", "oracle")} if family == "weak" else {})}
            models.update({r: p("models", r) for r in names})
            result = evaluate_models(models, baseline=sft, data=data, gen=gen, reward="ground_truth", batch_size=32)
            final.update(_summaries(result, sft))
            if not snapshots:
                continue
            for run in names:
                steps = {0: p("models", sft), self.steps: p("models", run)}
                ckpt = p("ckpt", run)
                for entry in os.listdir(ckpt) if os.path.isdir(ckpt) else []:
                    if entry.startswith("global_step") and entry.endswith("_hf"):
                        steps.setdefault(int(entry[len("global_step"):-3]), os.path.join(ckpt, entry))
                inner = {f"step{s}": path for s, path in sorted(steps.items()) if 0 < s < self.steps}
                result = evaluate_models({sft: p("models", sft), **inner}, baseline=sft, data=no_pairs, gen=gen,
                                         reward="ground_truth", batch_size=32)
                curve = {int(k[4:]): v for k, v in _summaries(result, sft).items() if k.startswith("step")}
                curve[0], curve[self.steps] = final[sft], final[run]
                curves[run] = {s: curve[s] for s in sorted(curve)}
        return final, curves

    # --- selection quality and token counts -----------------------------------------------------------
    def selection_stats(self, seed):
        """Per selective run: precision / recall of its training selection against the planted key tokens of the
        side's sign (good key words in chosen answers, bad ones in rejected: the tokens the preference is about),
        and per run the response tokens whose log-probs enter its loss (all epochs); each scorer's (the oracle, and
        the token RM when one was trained) precision / recall at each k of K_VALUES; the base rate of those key
        tokens among response tokens."""
        import numpy as np
        from transformers import AutoTokenizer

        from openrlhf_sepo.datasets import DataStrategy, TokenScoreDataset

        tok = AutoTokenizer.from_pretrained(self.seed_path(seed, "models", "sft"))
        strategy = DataStrategy(None, quiet=True)

        def dataset(scores, k, selection, exclude_prefix):
            return TokenScoreDataset(self.seed_path(seed, scores), tok, 128, strategy, k_chosen=k, k_rejected=k,
                                     selection=selection, exclude_common_prefix=exclude_prefix, seed=seed)

        base = dataset("scores", 1.0, "per_response", False)
        key = {}
        for side, sign in (("chosen", 1), ("rejected", -1)):
            ids = base.data[f"{side}_input_ids"]
            key[side] = np.concatenate([tiny.key_token_signs(tok.convert_ids_to_tokens(row[p:]))
                                        for row, p in zip(ids, base.prompt_lens)]) == sign
        n_key = sum(int(v.sum()) for v in key.values())
        n_tokens = sum(len(v) for v in key.values())

        def quality(ds):
            hits = sum(int((ds.selected[s] & key[s]).sum()) for s in key)
            picked = sum(int(ds.selected[s].sum()) for s in key)
            return hits / picked, hits / n_key, picked

        epochs = self.size["policy_epochs"]
        stats = {"precision": {}, "recall": {}, "training_tokens": {}, "base_rate": n_key / n_tokens,
                 "oracle_precision": {}, "oracle_recall": {}}
        for method in self.methods:
            spec = METHODS[method]
            if spec["trainer"] == "dpo":
                stats["training_tokens"][method] = n_tokens * epochs
                continue
            if spec["trainer"] != "sepo":  # wmle, wmle_onpolicy, sft_chosen: every chosen token, weighted or not
                stats["training_tokens"][method] = len(key["chosen"]) * epochs
                continue
            ds = dataset(SCORES_DIRS[spec["scores"]], spec["k"], spec["selection"], spec["exclude_prefix"])
            assert len(ds) == len(base), "every scores dir of a seed holds the same policy pairs"
            precision, recall, picked = quality(ds)
            if spec["k"] < 1.0:
                stats["precision"][method], stats["recall"][method] = precision, recall
            # The NLL term reads every chosen token: selected rejected tokens + all chosen tokens.
            nll_tokens = len(key["chosen"]) + int(ds.selected["rejected"].sum())
            stats["training_tokens"][method] = (nll_tokens if spec["nll"] else picked) * epochs
        scorers = ["oracle"] + [sc for sc in ("token_rm", "oracle_x") if os.path.isdir(self.seed_path(seed, SCORES_DIRS[sc]))]
        for scorer in scorers:
            for k in K_VALUES:
                precision, recall, _ = quality(dataset(SCORES_DIRS[scorer], k, "per_response", False))
                stats.setdefault(f"{scorer}_precision", {})[str(k)] = precision
                stats.setdefault(f"{scorer}_recall", {})[str(k)] = recall
        return stats

    # --- the two modes --------------------------------------------------------------------------------
    def prepare(self):
        for seed in self.seeds:
            self.stage(f"data s{seed}", lambda seed=seed: self.make_data(seed), self.seed_path(seed, "done", "data.done"))
        self.launch("stage1", [j for seed in self.seeds for j in self.stage1_jobs(seed)])
        if any(METHODS[m].get("scores") == "truth" for m in self.methods):
            for seed in self.seeds:
                self.stage(f"truth s{seed}", lambda seed=seed: self.write_truth_scores(seed),
                           self.seed_path(seed, "done", "truth.done"))

    def run_benchmark(self):
        start = time.time()
        self.prepare()
        loops = {m: (m, self.settings[m]) for m in self.methods if METHODS[m]["trainer"] == "wmle_loop"}
        self.launch("stage2", [self.policy_job(seed, m, m, self.settings[m], snapshots=True)
                               for seed in self.seeds for m in self.methods if m not in loops])
        if loops:
            self.run_loops(loops, snapshots=True)
        for seed in self.seeds:
            def evaluate(seed=seed):
                final, curves = self.evaluate_seed(seed, {m: m for m in self.methods}, "test", snapshots=True)
                stats = self.selection_stats(seed)
                with open(self.seed_path(seed, "evaluation.json"), "w") as f:
                    json.dump({"final": final, "curves": curves, "selection": stats}, f, indent=1)
            self.stage(f"eval s{seed}", evaluate, self.seed_path(seed, "done", "evaluate.done"))
        from openrlhf_sepo.cli.demo_report import write_report

        print("[demo] report     ...", flush=True)
        metrics = write_report(self)
        bad = [k for k, v in _flatten(metrics).items() if not math.isfinite(v) and not k.startswith("ci95.")]
        if bad:
            raise SystemExit(f"[demo] non-finite metrics: {bad}")
        print(f"[demo] finished in {time.time() - start:.0f} s. Report: {self.path('report.md')}")
        with open(self.path("report.md")) as f:
            print("".join(f.readlines()[:40]))

    def run_sweep(self):
        """Every method at every grid point on the first seed, scored on the validation prompts; the best point
        of each method by ``OBJECTIVE`` becomes its setting. Writes sweep.json (the ``--settings`` format)."""
        start = time.time()
        self.prepare()
        seed = self.seeds[0]
        name = lambda m, p: f"{m}__lr{p['lr']:g}" + (f"_b{p['beta']:g}" if "beta" in p else "")  # noqa: E731
        runs = {name(m, p): (m, p) for m in self.methods for p in grid_points(m)}
        loops = {r: (m, p) for r, (m, p) in runs.items() if METHODS[m]["trainer"] == "wmle_loop"}
        self.launch("sweep", [self.policy_job(seed, r, m, p, snapshots=False) for r, (m, p) in runs.items()
                              if r not in loops])
        if loops:
            self.run_loops(loops, snapshots=False)

        def evaluate():
            final, _ = self.evaluate_seed(seed, {r: m for r, (m, _) in runs.items()}, "validation", snapshots=False)
            with open(self.seed_path(seed, "sweep_evaluation.json"), "w") as f:
                json.dump(final, f, indent=1)
        self.stage("sweep eval", evaluate, self.seed_path(seed, "done", "sweep_evaluation.done"))
        with open(self.seed_path(seed, "sweep_evaluation.json")) as f:
            final = json.load(f)
        scores, settings = {}, {}
        for r, (m, p) in runs.items():
            scores.setdefault(m, {})[point_label(p)] = {
                "objective": final[r]["gated_reward"], "ground_truth_reward": final[r]["ground_truth_reward"],
                "format_validity": final[r]["format_validity"], "kl_to_sft": final[r]["kl_to_sft"]}
        for m in self.methods:
            best = max(grid_points(m), key=lambda p: final[name(m, p)]["gated_reward"])
            settings[m] = best
        doc = {"grid": GRID, "objective": OBJECTIVE, "seed": seed, "prompts": "validation",
               "task": {"variant": self.args.task, "label_noise": self.args.label_noise,
                        "policy_steps": self.steps, **self.size},
               "settings": settings, "validation": scores, "wall_time_s": round(time.time() - start, 1)}
        with open(self.path("sweep.json"), "w") as f:
            json.dump(doc, f, indent=1)
        print(f"[demo] sweep finished in {time.time() - start:.0f} s: {self.path('sweep.json')}")
        for m in self.methods:
            row = "  ".join(f"{c}: {v['objective']:+.3f}" for c, v in scores[m].items())
            print(f"  {m:<12} best {settings[m]}   {row}")


def _summaries(result, baseline):
    """evaluate_models output -> {model: the scalar metrics the demo reports} (KL and win rate vs ``baseline``)."""
    out = {}
    for name, m in result["models"].items():
        out[name] = {
            "ground_truth_reward": m["reward_mean"],
            "format_validity": m["format_validity"],
            "kl_to_sft": m[f"kl_to_{baseline}"],
            "win_rate_vs_sft": m[f"win_rate_vs_{baseline}"],
            "gated_reward": gated_reward(m["samples"]),
            "samples": [s["response"] for s in m["samples"][:3]],
        }
        if "pairwise_accuracy" in m:
            out[name]["pairwise_accuracy"] = m["pairwise_accuracy"]
    return out


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def build_parser():
    p = argparse.ArgumentParser(description="SePO vs DPO vs SimPO on the embedded key-word task, seeded and tuned (CPU).")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--quick", action="store_true", help="reduced sizes and methods (the CI test of the pipeline)")
    p.add_argument("--sweep", action="store_true",
                   help="re-derive the tuned settings: every method on the grid, first seed, validation prompts")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, each redrawing data, models and runs (default 0,1,2; --quick: 0,1)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--settings", default=SETTINGS_FILE, help="tuned settings (a --sweep's sweep.json)")
    p.add_argument("--task", default="independent", choices=list(tiny.TASK_VARIANTS), help="pair variant")
    p.add_argument("--label_noise", type=float, default=0.0, help="fraction of training pairs flipped")
    p.add_argument("--ood", action="store_true",
                   help="out-of-distribution data: the oracle's pairs from one half of the topics and filler words "
                        "(tiny.OOD_SLICES), the policies' pairs from the other")
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks per launch")
    p.add_argument("--oracle_lr", type=float, default=1e-4,
                   help="DPO learning rate of the oracle: gentle, so that its token rewards stay local")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.label_noise < 0.5:
        raise SystemExit(f"--label_noise must be in [0, 0.5), got {args.label_noise}")
    demo = Demo(args)
    demo.run_sweep() if args.sweep else demo.run_benchmark()


if __name__ == "__main__":
    main()

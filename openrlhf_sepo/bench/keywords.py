"""The demo's task spec: a seeded, tuned comparison of SePO with DPO and SimPO on the embedded key-word task (CPU).

``python -m openrlhf_sepo.cli.demo --output_dir demo_output`` (README command 1, ``make demo``) runs
``KeywordSpec`` through the harness (``bench.runner``): every method of ``METHODS`` at its tuned setting
(``demo_settings.json``) on each seed of ``--seeds``; ``--sweep`` re-derives those settings on the validation prompts
instead (docs/benchmark.md says how).

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
            (``bench.keywords_report``)
"""

import json
import os

from openrlhf_sepo import testbed, tiny
from openrlhf_sepo.bench import keywords_report
from openrlhf_sepo.bench.runner import BATCH, CHAT, COMMON_TRAIN, Benchmark, sft_job

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
_PPO = dict(trainer="ppo", dense="none", nll=0.0, policy="weak")
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
    # ConfPO's zero-cost selection: the tokens the policy itself finds unlikely, each step (no oracle, no scores).
    "confidence": dict(_SEPO, scores="oracle", selection="confidence"),
    # The second perfect-credit control: reward-weighted MLE on the chosen answers with the true token rewards
    # mapped to [0, 1] ((sign + 1) / 2: right key word 1, filler 0.5, wrong key word 0).
    "wmle_truth": dict(_WMLE, scores="truth01"),
    # The imitation term without the tokens the scorer marks bad (train_sepo --sepo.nll_skip_bad).
    "sepo_nll_skip": dict(_SEPO, nll_skip=True),
    "sepo_truth_nll_skip": dict(_SEPO, scores="truth", nll_skip=True),
    # OpenRLHF's Ray PPO (train_ppo_dense) from the SFT model, its sequence reward the reward model train_rm learns
    # from the policy pairs (also the critic's start), GAE, the same number of rollouts in every PPO arm. ppo: the
    # bandit reward at EOS only (OpenRLHF's PPO unchanged); ppo_dense: plus RTO's dense reward from the DPO oracle
    # against the SFT model (PPO's own reference, reused); ppo_dense_token_rm: plus the token RM's rewards.
    "ppo": _PPO,
    "ppo_dense": dict(_PPO, dense="oracle"),
    "ppo_dense_token_rm": dict(_PPO, dense="token_rm", scores="token_rm"),
}
# The testbed's default run (README command 1): the headline methods; the others stay one --methods away.
TESTBED_METHODS = ["sepo", "sepo_paper", "sepo_random", "sepo_truth", "confidence", "sepo_nll_skip",
                   "sepo_truth_nll_skip", "dpo", "dpo_nll", "simpo_nll", "sepo_token_rm", "wmle", "wmle_truth",
                   "sft_chosen", "w2s_sepo", "w2s_dpo_nll"]
BETA_TRAINERS = {"sepo": "--sepo.beta", "dpo": "--model.beta"}  # the other trainers have no beta
LOOP_ROUNDS, LOOP_SAMPLES = 2, 4  # wmle_onpolicy: rounds, answers sampled per training prompt and round
# Each method's "scores" -> the seed's scores dir it trains from (and selection_stats reads).
SCORES_DIRS = {"oracle": "scores", "truth": "scores_truth", "token_rm": "scores_token_rm", "oracle_x": "scores_x",
               "truth01": "scores_truth01"}
X_VOCAB = 300  # the cross-tokenizer oracle's BPE vocabulary (the policy's: 512)
TOKEN_RM_LR = 1e-3  # the token RM's learning rate, fixed as the oracle's is (it is a scorer, not a tuned policy)
# The PPO arms: the dense term's scale per source. The oracle's is its DPO beta (0.1), which puts the summed dense
# reward on the scale of DPO's implicit reward beta * log(pi_o / pi_ref), the scale a Bradley-Terry reward model
# learns (RTO's convention); the token RM is trained on that scale already.
PPO_DENSE_COEF = {"oracle": 0.1, "token_rm": 1.0}
PPO_KL_COEF = 0.01  # OpenRLHF's default --algo.kl.init_coef, the same in every PPO arm
QUICK_METHODS = ["sepo", "sepo_random", "sepo_truth", "dpo_nll", "simpo", "w2s_sepo", "sepo_token_rm", "wmle",
                 "wmle_onpolicy"]
# PPO's arms have their own learning rates (actor and critic alike): on the offline grid (1e-3 to 1e-2) no PPO point
# scored above 0, eight of nine with no well-formed answer (format validity 0.00; ppo at 1e-3: 0.70; KL to SFT 7 to
# 793; sweep of 2026-12-07, docs/ppo_dense.md), each arm's optimum at or beyond the grid's low edge.
PPO_LR = [1e-4, 3e-4, 1e-3]
GRID = {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "sepo_beta": [1.0, 2.5], "dpo_beta": [0.1, 0.5], "ppo_lr": PPO_LR}
OBJECTIVE = ("mean over validation samples of the ground-truth reward, a malformed answer (not "
             "the task's is_well_formed) counting as -1")
SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_settings.json")  # tiny's variants
TESTBED_SETTINGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testbed_settings.json")
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
# The testbed's answers are five times longer: SFT gets twice the epochs (at 3, only 0.3 of the SFT model's sampled
# answers followed the template), and its grid drops the smallest learning rates (on 24 steps they stay near SFT).
# quick tests the pipeline, not the policies' quality, and its SFT at full epochs took most of CI's hour (two SFT
# models per seed on 800 long answers x 6 epochs): a sixth of that SFT keeps every stage and metric it checks.
TESTBED_SIZES = {"full": dict(SIZES["full"], sft_epochs=6), "quick": dict(SIZES["quick"], n_sft=400, sft_epochs=2)}
TESTBED_QUICK_METHODS = ["sepo", "sepo_random", "sepo_truth", "confidence", "dpo_nll", "simpo", "w2s_sepo",
                         "sepo_token_rm", "wmle", "wmle_onpolicy", "wmle_truth"]
TESTBED_GRID = {"lr": [1e-3, 3e-3, 1e-2], "sepo_beta": [1.0, 2.5], "dpo_beta": [0.1, 0.5], "ppo_lr": PPO_LR}
# Paired comparisons read in the report: (a, b) -> a - b in ground truth, seed by seed.
COMPARISONS = [("sepo_truth", "dpo_nll"), ("sepo_truth", "simpo_nll"), ("wmle_truth", "dpo_nll"),
               ("wmle_truth", "simpo_nll"), ("sepo_truth_nll_skip", "dpo_nll"), ("sepo_truth_nll_skip", "simpo_nll"),
               ("sepo", "confidence"), ("confidence", "simpo_nll"), ("sepo_nll_skip", "sepo"),
               ("sepo_truth_nll_skip", "sepo_truth"), ("sepo", "dpo_nll"), ("sepo", "simpo_nll"), ("sepo", "sepo_random"),
               ("sepo_truth", "sepo"),
               ("sepo", "sepo_paper"), ("sepo_exclude_prefix", "sepo"), ("sepo_paper_exclude_prefix", "sepo_paper"),
               ("sepo_paper", "dpo"), ("sepo_paper", "simpo"), ("w2s_sepo", "w2s_dpo_nll"),
               ("w2s_sepo", "w2s_simpo_nll"), ("sepo_token_rm", "sepo"), ("wmle", "sft_chosen"), ("wmle", "sepo"),
               ("wmle", "dpo_nll"), ("wmle_onpolicy", "wmle"), ("sft_chosen", "sft"), ("w2s_x_sepo", "w2s_sepo"),
               ("w2s_x_sepo", "w2s_dpo_nll"), ("w2s_x_sepo", "w2s_simpo_nll"),
               ("ppo_dense", "ppo"), ("ppo_dense_token_rm", "ppo"), ("ppo_dense", "ppo_dense_token_rm"),
               ("ppo_dense", "sepo"), ("ppo_dense", "dpo_nll"), ("ppo", "dpo_nll")]
GEN = dict(max_new_tokens=48, temperature=1.0, top_p=1.0)  # every sample: temperature 1, full support


def gen_settings(task) -> dict:
    """Sampling settings: answers of the testbed ``task`` (a ``testbed.Task``) get room for length + 32 tokens."""
    return dict(GEN, max_new_tokens=task.length + 32) if task else GEN


TESTBED_OBJECTIVE = ("mean over validation samples of the ground-truth reward, a malformed answer (not "
                     "testbed.is_well_formed) counting as 0")


def credited_reward(samples) -> float:
    """The testbed's tuning objective (``TESTBED_OBJECTIVE``): ground truth of well-formed answers, 0 for malformed
    ones. Why not tiny's -1: with 62-token answers sampled at temperature 1, the first sweep on the testbed under the
    -1 rule chose the grid's smallest learning rate (the least movement from the SFT model) for 11 of its 16 methods,
    whatever they learned; 0 is what an answer with random key words earns in expectation."""
    return sum(s["reward"] if s["well_formed"] else 0.0 for s in samples) / len(samples)


def gated_reward(samples) -> float:
    """The tuning objective (``OBJECTIVE``): ground truth of well-formed answers, -1 for malformed ones."""
    return sum(s["reward"] if s["well_formed"] else -1.0 for s in samples) / len(samples)


def loop_metric(reward: float, well_formed: bool) -> float:
    """wmle_onpolicy's ranking metric of a sampled answer: the ground truth of a well-formed answer (in [-1, 1]), and
    ground truth - 2.5 (in [-3.5, -1.5]) of a malformed one: format first, then the key words. (The gated reward's
    flat -1 for every malformed answer left most lists of a weak SFT model's samples all tied.)"""
    return reward - (0.0 if well_formed else 2.5)


def run(args) -> dict:
    """The demo for parsed ``cli.demo`` flags: the benchmark, or with ``args.sweep`` the sweep."""
    testbed_task = None
    if args.task == "testbed":
        knobs = dict(length=args.length, density=args.density, context=not args.no_context,
                     flaw_rate=args.flaw_rate, flaws=args.flaws, cue=args.cue)
        if args.label_noise is not None:
            knobs["label_noise"] = args.label_noise
        try:
            testbed_task = testbed.Task(**knobs)
        except ValueError as e:  # names the knob, which is the flag
            raise SystemExit(f"--{str(e).split(': ', 1)[1]}") from None
    spec = KeywordSpec(task=args.task, label_noise=args.label_noise or 0.0, ood=args.ood, oracle_lr=args.oracle_lr,
                       testbed_task=testbed_task)
    args.settings = args.settings or spec.SETTINGS_FILE
    return Benchmark(spec, args).run()


class KeywordSpec:
    """The key-word task for ``bench.runner.Benchmark`` (its docstring lists what a spec provides). ``task`` /
    ``label_noise`` / ``ood``: tiny's pair variant, the share of training pairs flipped, and whether the oracle's and
    the policies' pairs come from disjoint topic and filler slices (``tiny.OOD_SLICES``); ``oracle_lr``: the
    oracle's DPO learning rate. ``task="testbed"`` with ``testbed_task`` (a ``testbed.Task``, which holds its own
    label noise): the testbed's data, truth and scorers instead of tiny's, its headline methods by default and its
    tuned settings. ``curves=False``: no training snapshots and no per-step evaluation, so no frontier or curve plot
    (a third of the evaluation's cost; the regime map reads the final models only)."""

    NAME, POLICY_LAUNCH, DEFAULT_METHODS = "demo", "stage2", list(METHODS)
    METHODS, QUICK_METHODS, SIZES, GRID, COMPARISONS = METHODS, QUICK_METHODS, SIZES, GRID, COMPARISONS
    OBJECTIVE, OBJECTIVE_KEY, SETTINGS_FILE = OBJECTIVE, "gated_reward", SETTINGS_FILE
    BETA_TRAINERS, SCORES_DIRS, K_VALUES, MODELS = BETA_TRAINERS, SCORES_DIRS, K_VALUES, MODELS
    LOOP_ROUNDS, LOOP_SAMPLES, X_VOCAB, TOKEN_RM_LR = LOOP_ROUNDS, LOOP_SAMPLES, X_VOCAB, TOKEN_RM_LR

    def __init__(self, task="independent", label_noise=0.0, ood=False, oracle_lr=1e-4, testbed_task=None, curves=True):
        if (task == "testbed") != (testbed_task is not None):
            raise ValueError("KeywordSpec: testbed_task is given exactly when task == 'testbed'")
        if testbed_task is not None and ood:
            raise SystemExit("--ood: tiny's variants only (the testbed has no topic / filler slices)")
        self.task, self.label_noise, self.ood, self.oracle_lr = task, label_noise, ood, oracle_lr
        self.testbed = testbed_task
        self.curves = curves  # False: no training snapshots, no curve evaluation (the regime map reads finals only)
        if testbed_task is not None:
            self.label_noise = testbed_task.label_noise
            self.DEFAULT_METHODS, self.SETTINGS_FILE = TESTBED_METHODS, TESTBED_SETTINGS_FILE
            self.SIZES, self.GRID, self.QUICK_METHODS = TESTBED_SIZES, TESTBED_GRID, TESTBED_QUICK_METHODS
            self.OBJECTIVE, self.OBJECTIVE_KEY = TESTBED_OBJECTIVE, "credited_reward"
        self.gen = gen_settings(testbed_task)

    # --- the task's truth: tiny's ignores the prompt, the testbed's reads the reader from it ---------------
    def token_signs(self, pieces, prompt_text) -> list:
        """+1 / -1 / 0 per response token: right key word, wrong key word, other."""
        if self.testbed is None:
            return tiny.key_token_signs(pieces)
        return testbed.token_signs(pieces, prompt_text, self.testbed)

    def truth(self, prompt_text, text) -> float:
        """The ground-truth reward of one answer to one prompt."""
        if self.testbed is None:
            return tiny.ground_truth_reward(text)
        return testbed.ground_truth_reward(prompt_text, text, self.testbed)

    def well_formed(self, text) -> bool:
        return tiny.is_well_formed(text) if self.testbed is None else testbed.is_well_formed(text, self.testbed)

    def uses(self, bench, key, value) -> bool:
        """Whether a method of this run has ``METHODS[m][key] == value`` (what stage 1 must train)."""
        return any(self.METHODS[m].get(key) == value for m in bench.methods)

    # --- the grid -------------------------------------------------------------------------------------
    def setting_flags(self, method: str, setting: dict) -> list:
        """The command-line flags of one grid point: learning rate, and the method's beta if its trainer has one."""
        beta = self.BETA_TRAINERS.get(self.METHODS[method]["trainer"].removesuffix("_loop"))
        return ["--adam.lr", str(setting["lr"]), *([beta, str(setting["beta"])] if beta else [])]

    def grid_points(self, method: str):
        """The grid of ``method``: lr x its beta (SePO/SimPO or DPO betas), lr alone for a trainer without beta, and
        the PPO learning rates for a PPO arm."""
        trainer = self.METHODS[method]["trainer"]
        if trainer == "ppo":
            return [{"lr": lr} for lr in self.GRID["ppo_lr"]]
        if trainer not in self.BETA_TRAINERS:
            return [{"lr": lr} for lr in self.GRID["lr"]]
        betas = self.GRID["dpo_beta"] if trainer == "dpo" else self.GRID["sepo_beta"]
        return [{"lr": lr, "beta": beta} for lr in self.GRID["lr"] for beta in betas]

    @staticmethod
    def run_name(method: str, point: dict) -> str:
        return f"{method}__lr{point['lr']:g}" + (f"_b{point['beta']:g}" if "beta" in point else "")

    # --- data and stage 1 -----------------------------------------------------------------------------
    def make_data(self, bench, seed):
        if self.testbed is not None:
            return self._make_testbed_data(bench, seed)
        s, d = bench.size, lambda *p: bench.seed_path(seed, "data", *p)
        tiny.build_tokenizer(d("tokenizer"))
        for name, shape in self.MODELS.items():
            tiny.build_model(d(f"base_{name}"), d("tokenizer"), shape["hidden_size"], shape["num_layers"], seed=seed)
        if self.uses(bench, "scores", "oracle_x"):  # the other tokenizer and a weak model on it (oracle_x / sft_x)
            tiny.build_tokenizer(d("tokenizer_x"), self.X_VOCAB)
            tiny.build_model(d("base_weak_x"), d("tokenizer_x"), **self.MODELS["weak"], seed=seed)
        tiny.write_sft_data(d("sft.jsonl"), s["n_sft"], seed)
        # Disjoint seeds: the oracle never sees the policy's pairs, and evaluation sees neither.
        task = dict(variant=self.task, label_noise=self.label_noise)
        ood = self.ood  # the oracle's pairs from one slice of topics and filler words, the policy's from the other
        tiny.write_preference_data(d("oracle_pairs.jsonl"), s["n_oracle"], 1000 * seed + 1, **task,
                                   ood_slice="oracle" if ood else None)
        tiny.write_preference_data(d("policy_pairs.jsonl"), s["n_policy"], 1000 * seed + 2, **task,
                                   ood_slice="policy" if ood else None)
        with open(d("policy_pairs.jsonl")) as f, open(d("policy_chosen.jsonl"), "w") as out:  # sft_chosen's data
            for line in f:
                out.write(json.dumps({"messages": json.loads(line)["chosen"]}) + "\n")
        tiny.write_preference_data(d("eval_pairs.jsonl"), s["n_eval"], 1000 * seed + 3, variant=self.task)
        for split in ("validation", "test"):
            with open(d(f"{split}_prompts.jsonl"), "w") as f:
                for row in tiny.make_prompts(s["n_prompts"], 1000 * seed + 4, split=split):
                    f.write(json.dumps(row) + "\n")

    def _make_testbed_data(self, bench, seed):
        """``make_data`` for the testbed: the same files and seeds, drawn by ``testbed``; evaluation pairs without
        label noise."""
        s, d, task = bench.size, lambda *p: bench.seed_path(seed, "data", *p), self.testbed
        testbed.build_tokenizer(d("tokenizer"), task)
        for name, shape in self.MODELS.items():
            tiny.build_model(d(f"base_{name}"), d("tokenizer"), shape["hidden_size"], shape["num_layers"], seed=seed)
        if self.uses(bench, "scores", "oracle_x"):
            testbed.build_tokenizer(d("tokenizer_x"), task, self.X_VOCAB)
            tiny.build_model(d("base_weak_x"), d("tokenizer_x"), **self.MODELS["weak"], seed=seed)
        testbed.write_sft_data(d("sft.jsonl"), s["n_sft"], task, seed)
        testbed.write_preference_data(d("oracle_pairs.jsonl"), s["n_oracle"], task, 1000 * seed + 1)
        testbed.write_preference_data(d("policy_pairs.jsonl"), s["n_policy"], task, 1000 * seed + 2)
        with open(d("policy_pairs.jsonl")) as f, open(d("policy_chosen.jsonl"), "w") as out:  # sft_chosen's data
            for line in f:
                out.write(json.dumps({"messages": json.loads(line)["chosen"]}) + "\n")
        testbed.write_preference_data(d("eval_pairs.jsonl"), s["n_eval"], task, 1000 * seed + 3, label_noise=0.0)
        for split in ("validation", "test"):
            testbed.write_prompts(d(f"{split}_prompts.jsonl"), s["n_prompts"], task, 1000 * seed + 4, split)

    def stage1(self, bench):
        """One launch of every seed's SFT models, oracles, token RM and scores; then the truth scores dirs."""
        bench.launch("stage1", [j for seed in bench.seeds for j in self.stage1_jobs(bench, seed)])
        if self.uses(bench, "scores", "truth") or self.uses(bench, "scores", "truth01"):
            for seed in bench.seeds:
                bench.stage(f"truth s{seed}", lambda seed=seed: self.write_truth_scores(bench, seed),
                            bench.seed_path(seed, "done", "truth.done"))

    def stage1_jobs(self, bench, seed):
        m, d = lambda *p: bench.seed_path(seed, "models", *p), lambda *p: bench.seed_path(seed, "data", *p)
        size, k_perc = bench.size, ["--k_perc", ",".join(map(str, self.K_VALUES))]
        jobs = [sft_job(bench, seed, "sft", d("base_weak"), d("sft.jsonl"), size["sft_epochs"])]
        if self.uses(bench, "policy", "strong"):
            jobs.append(sft_job(bench, seed, "strong_sft", d("base_strong"), d("sft.jsonl"), size["sft_epochs"]))
        jobs.append(self._oracle_job(bench, seed, "oracle", "sft"))
        if self.uses(bench, "scores", "token_rm"):
            # The token RM learns from the oracle's pairs (lists of two), from the SFT model, and scores the policy's.
            jobs.append(self._token_rm_job(bench, seed, "token_rm", m("sft"), [d("oracle_pairs.jsonl")],
                                           size["oracle_epochs"]))
            jobs.append(self._scores_job(bench, seed, "scores_token_rm", [
                "--scorer", "token_rm", "--token_rm.model_name_or_path", m("token_rm")], k_perc))
        if self.uses(bench, "scores", "oracle_x"):
            jobs.append(sft_job(bench, seed, "sft_x", d("base_weak_x"), d("sft.jsonl"), size["sft_epochs"]))
            jobs.append(self._oracle_job(bench, seed, "oracle_x", "sft_x"))
            jobs.append(self._scores_job(bench, seed, "scores_x", [
                "--oracle.model_name_or_path", m("oracle_x"), "--ref.model_name_or_path", m("sft_x"),
                "--policy.tokenizer", d("tokenizer")], k_perc))
        jobs.append(self._scores_job(bench, seed, "scores", [
            "--oracle.model_name_or_path", m("oracle"), "--ref.model_name_or_path", m("sft")], k_perc))
        if self.uses(bench, "trainer", "ppo"):
            # The PPO arms' sequence reward: OpenRLHF's train_rm from the SFT model on the policy pairs (the pairs the
            # offline methods learn from), lr TOKEN_RM_LR like the token RM's, as a user of OpenRLHF would have it.
            jobs.append(bench.job(seed, "rm", "openrlhf.cli.train_rm", [
                "--model.model_name_or_path", m("sft"), "--data.dataset", d("policy_pairs.jsonl"), *COMMON_TRAIN,
                *CHAT, "--train.max_epochs", str(size["oracle_epochs"]), "--adam.lr", str(self.TOKEN_RM_LR),
                "--ckpt.output_dir", m("rm"), "--ckpt.path", bench.seed_path(seed, "ckpt", "rm"),
                "--train.seed", str(seed)]))
        return jobs

    def _oracle_job(self, bench, seed, name, sft):
        """The oracle: OpenRLHF DPO from ``sft`` (also its reference) on the oracle pairs, beta 0.1, ``oracle_lr``."""
        m = lambda *p: bench.seed_path(seed, "models", *p)  # noqa: E731
        return bench.job(seed, name, "openrlhf.cli.train_dpo", [
            "--model.model_name_or_path", m(sft), "--ref.model_name_or_path", m(sft),
            "--data.dataset", bench.seed_path(seed, "data", "oracle_pairs.jsonl"), *COMMON_TRAIN, *CHAT,
            "--train.max_epochs", str(bench.size["oracle_epochs"]), "--adam.lr", str(self.oracle_lr),
            "--model.beta", "0.1", "--ckpt.output_dir", m(name), "--ckpt.path", bench.seed_path(seed, "ckpt", name),
            "--train.seed", str(seed)])

    def _token_rm_job(self, bench, seed, name, init, data_flags, epochs):
        """A token RM (train_token_rm from ``init``) on ``--data.dataset`` + ``data_flags``, lr TOKEN_RM_LR."""
        return bench.job(seed, name, "openrlhf_sepo.cli.train_token_rm", [
            "--model.model_name_or_path", init, "--data.dataset", *data_flags, *COMMON_TRAIN, *CHAT,
            "--train.max_epochs", str(epochs), "--adam.lr", str(self.TOKEN_RM_LR),
            "--ckpt.output_dir", bench.seed_path(seed, "models", name),
            "--ckpt.path", bench.seed_path(seed, "ckpt", name), "--train.seed", str(seed)])

    @staticmethod
    def _scores_job(bench, seed, name, scorer_flags, extra=(), out=None):
        """score_tokens with ``scorer_flags`` on the policy pairs into the seed's dir ``out`` (default ``name``)."""
        return bench.job(seed, name, "openrlhf_sepo.cli.score_tokens", [
            *scorer_flags, "--data.dataset", bench.seed_path(seed, "data", "policy_pairs.jsonl"),
            "--data.apply_chat_template", "--data.max_len", "128", "--output_dir", bench.seed_path(seed, out or name),
            "--overwrite", *extra])

    def write_truth_scores(self, bench, seed):
        """The truth controls' scores dirs: the oracle's scores dir with each score replaced by the task's true token
        reward (``token_signs``: +1 on a right key word, -1 on a wrong one, 0 elsewhere), so that selection keeps
        right key tokens of chosen and wrong ones of rejected first; same ids, manifest and flags, so it trains
        exactly like SePO. ``scores_truth01`` holds (sign + 1) / 2, the non-negative rewards wmle_truth weights by."""
        from transformers import AutoTokenizer

        from openrlhf_sepo import scores_dir

        tok = AutoTokenizer.from_pretrained(bench.seed_path(seed, "models", "sft"))

        def truth(row, side):
            ids, p = row[f"{side}_input_ids"], row["prompt_len"]
            return self.token_signs(tok.convert_ids_to_tokens(ids[p:]), tok.decode(ids[:p]))

        scores_dir.rewrite_scores(bench.seed_path(seed, "scores"), bench.seed_path(seed, "scores_truth"), truth)
        scores_dir.rewrite_scores(bench.seed_path(seed, "scores"), bench.seed_path(seed, "scores_truth01"),
                                  lambda row, side: [(x + 1) / 2 for x in truth(row, side)])

    # --- stage 2: policies ----------------------------------------------------------------------------
    def train(self, bench, runs, snapshots, launch):
        """Every run of ``runs`` ({name: (method, setting)}) on every seed: one launch, then wmle_onpolicy's rounds."""
        snapshots = snapshots and self.curves
        trainer = lambda mp: self.METHODS[mp[0]]["trainer"]  # noqa: E731
        loops = {r: mp for r, mp in runs.items() if trainer(mp) == "wmle_loop"}
        ppo = {r: mp for r, mp in runs.items() if trainer(mp) == "ppo"}
        bench.launch(launch, [self.policy_job(bench, seed, r, m, p, snapshots) for seed in bench.seeds
                              for r, (m, p) in runs.items() if r not in loops and r not in ppo])
        if loops:
            self.run_loops(bench, loops, snapshots)
        if ppo:  # a Ray job starts its own workers: one process per run, not a torchrun launch
            bench.run_each(f"{launch}_ppo", [self.ppo_job(bench, seed, r, m, p) for seed in bench.seeds
                                            for r, (m, p) in ppo.items()])

    def ppo_job(self, bench, seed, name, method, setting):
        """One PPO run (``train_ppo_dense``) on the CPU: actor from the SFT model, critic from the reward model, its
        sequence reward at EOS; the method's dense source; actor and critic at the setting's learning rate. Every arm
        samples one answer per policy prompt per episode, policy_epochs episodes, rollout batch = global batch
        (BATCH), one PPO epoch per rollout: the offline methods' number of optimizer steps, the same rollouts in
        every arm. No snapshots (its checkpoints are DeepSpeed states, not HF dirs): its curve is SFT -> final."""
        m, d = lambda *p: bench.seed_path(seed, "models", *p), lambda *p: bench.seed_path(seed, "data", *p)
        dense = self.METHODS[method]["dense"]
        source = {"none": [], "oracle": ["--dense.oracle", m("oracle")], "token_rm": ["--dense.token_rm", m("token_rm")]}
        lr = str(setting["lr"])
        return bench.job(seed, name, "openrlhf_sepo.cli.train_ppo_dense", [
            "--dense.source", dense, *source[dense],
            *(["--dense.coef", str(PPO_DENSE_COEF[dense])] if dense != "none" else []),
            "--actor.model_name_or_path", m("sft"), "--reward.model_name_or_path", m("rm"),
            "--critic.model_name_or_path", m("rm"), "--data.prompt_dataset", d("policy_pairs.jsonl"),
            "--data.input_key", "prompt", *CHAT, "--data.max_len", "192",
            "--rollout.max_new_tokens", str(self.gen["max_new_tokens"]), "--rollout.temperature", "1.0",
            "--rollout.batch_size", str(BATCH), "--rollout.micro_batch_size", "8", "--rollout.n_samples_per_prompt", "1",
            "--train.batch_size", str(BATCH), "--train.micro_batch_size", "8", "--train.max_epochs", "1",
            "--train.num_episodes", str(bench.size["policy_epochs"]),
            "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1", "--critic.num_gpus_per_node", "1",
            "--ref.num_gpus_per_node", "1", "--reward.num_gpus_per_node", "1", "--vllm.num_engines", "1",
            "--vllm.sync_backend", "gloo", "--algo.advantage.estimator", "gae", "--algo.kl.init_coef", str(PPO_KL_COEF),
            "--actor.adam.lr", lr, "--critic.adam.lr", lr, "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2",
            "--ds.param_dtype", "bf16", "--ckpt.output_dir", m(name), "--ckpt.path", bench.seed_path(seed, "ckpt", name),
            "--train.seed", str(seed)])

    def policy_job(self, bench, seed, name, method, setting, snapshots, init=None, scores=None, epochs=None):
        """The training job of one policy run; ``init`` / ``scores`` / ``epochs`` override the method's start model,
        scores dir and epochs (wmle_onpolicy's rounds)."""
        spec = self.METHODS[method]
        m, d = lambda *p: bench.seed_path(seed, "models", *p), lambda *p: bench.seed_path(seed, "data", *p)
        init = init or m("sft" if spec["policy"] == "weak" else "strong_sft")
        scores = scores or bench.seed_path(seed, self.SCORES_DIRS.get(spec.get("scores"), ""))
        args = ["--model.model_name_or_path", init, *COMMON_TRAIN, "--train.max_epochs",
                str(epochs or bench.size["policy_epochs"]), "--train.seed", str(seed),
                *self.setting_flags(method, setting),
                "--ckpt.output_dir", m(name), "--ckpt.path", bench.seed_path(seed, "ckpt", name)]
        if snapshots:
            args += ["--ckpt.save_steps", str(bench.size["save_steps"]), "--ckpt.save_hf", "--ckpt.disable_ds"]
        if spec["trainer"] in ("wmle", "wmle_loop"):
            args += ["--data.dataset", scores, "--wmle.side", "chosen", "--wmle.weight", "reward"]
            return bench.job(seed, name, "openrlhf_sepo.cli.train_wmle", args)
        if spec["trainer"] == "sft":
            args += ["--data.dataset", d("policy_chosen.jsonl"), "--data.input_key", "messages", *CHAT]
            return bench.job(seed, name, "openrlhf.cli.train_sft", args)
        args += ["--model.nll_loss_coef", str(spec["nll"])]
        if spec["trainer"] == "sepo":
            args += ["--data.dataset", scores, "--sepo.k_chosen", str(spec["k"]), "--sepo.k_rejected",
                     str(spec["k"]), "--sepo.selection", spec["selection"], "--sepo.gamma", "0.0"]
            args += ["--sepo.exclude_common_prefix"] if spec["exclude_prefix"] else []
            args += ["--sepo.nll_skip_bad"] if spec.get("nll_skip") else []
            return bench.job(seed, name, "openrlhf_sepo.cli.train_sepo", args)
        args += ["--ref.model_name_or_path", init, "--data.dataset", d("policy_pairs.jsonl"), *CHAT]
        return bench.job(seed, name, "openrlhf.cli.train_dpo", args)

    def run_loops(self, bench, runs, snapshots):
        """wmle_onpolicy runs (``runs``: {name: (method, setting)}), LOOP_ROUNDS rounds on every seed, one launch per
        round. Round r: the round's policy (the SFT model first) samples LOOP_SAMPLES answers to each of n_policy
        training prompts; each list is ranked by ``loop_metric`` (format first, then ground truth); the token RM
        continues training on those lists (from the pair-trained token_rm); it scores
        the policy pairs; the policy continues with train_wmle for policy_epochs / LOOP_ROUNDS epochs. The last
        round's policy is models/NAME, so evaluation reads it like any other run."""
        epochs, rest = divmod(bench.size["policy_epochs"], self.LOOP_ROUNDS)
        assert rest == 0, "policy_epochs must be a multiple of LOOP_ROUNDS (the same step budget, whole epochs)"
        for r in range(1, self.LOOP_ROUNDS + 1):
            jobs = []
            for seed in bench.seeds:
                for name, (method, setting) in runs.items():
                    jobs += self._loop_round_jobs(bench, seed, r, name, method, setting, snapshots, epochs)
            bench.launch(f"loop_r{r}", jobs)

    def _loop_round_jobs(self, bench, seed, r, name, method, setting, snapshots, epochs):
        """Round ``r`` of run ``name`` on ``seed``: sample and rank (a stage, here), then the token RM, scores and
        policy jobs of the round's launch."""
        m = lambda *p: bench.seed_path(seed, "models", *p)  # noqa: E731
        tag, prev = f"{name}_r{r}", (f"{name}_r{r - 1}" if r > 1 else None)
        policy_in = m(prev) if prev else m("sft")
        lists = bench.seed_path(seed, "data", f"{tag}_lists.jsonl")
        bench.stage(f"sample {tag} s{seed}", lambda: self._sample_lists(bench, seed, r, policy_in, lists),
                    bench.seed_path(seed, "done", f"{tag}_lists.done"))
        rm_in = m(f"{prev}_token_rm") if prev else m("token_rm")
        scores = bench.seed_path(seed, f"scores_{tag}")
        return [
            self._token_rm_job(bench, seed, f"{tag}_token_rm", rm_in, [lists, "--data.prompt_key", "prompt"], 1),
            self._scores_job(bench, seed, f"{tag}_scores", [
                "--scorer", "token_rm", "--token_rm.model_name_or_path", m(f"{tag}_token_rm")], out=f"scores_{tag}"),
            self.policy_job(bench, seed, name if r == self.LOOP_ROUNDS else tag, method, setting,
                            snapshots and r == self.LOOP_ROUNDS, init=policy_in, scores=scores, epochs=epochs),
        ]

    def _sample_lists(self, bench, seed, r, policy_in, lists):
        """LOOP_SAMPLES answers of ``policy_in`` to each of n_policy training prompts, ranked by ``loop_metric``."""
        from openrlhf_sepo.evaluation import DataFlags, GenFlags, generate, load_policy

        model, tok = load_policy(policy_in)
        n, prompt_seed = bench.size["n_policy"], 1000 * seed + 5 + r
        rows = (tiny.make_prompts(n, prompt_seed, "train") if self.testbed is None
                else testbed.make_prompts(n, self.testbed, prompt_seed, "train"))
        prompts = [row["prompt"] for row in rows]
        answers = [generate(model, tok, prompts, DataFlags(apply_chat_template=True, max_len=128),
                            GenFlags(**self.gen, seed=seed * 100 + r * 10 + i), batch_size=64)
                   for i in range(self.LOOP_SAMPLES)]
        with open(lists, "w") as f:
            for j, prompt in enumerate(prompts):
                responses = [a[j] for a in answers]
                scores = [loop_metric(self.truth(prompt, t), self.well_formed(t)) for t in responses]
                f.write(json.dumps({"prompt": prompt, "responses": responses, "scores": scores}) + "\n")

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, bench, seed) -> dict:
        """The seed's evaluation.json: every method on the test prompts with its snapshots, and selection stats."""
        final, curves = self.evaluate_seed(bench, seed, {m: m for m in bench.methods}, "test", snapshots=self.curves)
        return {"final": final, "curves": curves, "selection": self.selection_stats(bench, seed)}

    def validate(self, bench, seed, runs) -> dict:
        return self.evaluate_seed(bench, seed, {r: m for r, (m, _) in runs.items()}, "validation", snapshots=False)[0]

    def sweep_entry(self, metrics) -> dict:
        return {"objective": metrics[self.OBJECTIVE_KEY], "ground_truth_reward": metrics["ground_truth_reward"],
                "format_validity": metrics["format_validity"], "kl_to_sft": metrics["kl_to_sft"]}

    def sweep_context(self, bench) -> dict:
        return {"prompts": "validation", "task": {"variant": self.task, "label_noise": self.label_noise,
                                                  "policy_steps": bench.steps, **bench.size,
                                                  **(self.testbed.as_dict() if self.testbed else {})}}

    def evaluate_seed(self, bench, seed, runs, prompts, snapshots):
        """{run: metrics} for ``runs`` ({name: method}) on ``prompts`` (validation or test), each family against
        its own SFT model; with ``snapshots``, also every saved training step (``curves``: run -> step -> metrics)."""
        from openrlhf_sepo.evaluation import DataFlags, GenFlags

        p = lambda *x: bench.seed_path(seed, *x)  # noqa: E731
        n = bench.size["n_prompts"]
        data = DataFlags(dataset=p("data", "eval_pairs.jsonl"), apply_chat_template=True, max_len=128)
        gen = GenFlags(prompts=p("data", f"{prompts}_prompts.jsonl"), n_prompts=n, **self.gen, seed=seed,
                       n_samples=n)
        final, curves = {}, {}
        for family, sft in (("weak", "sft"), ("strong", "strong_sft")):
            names = [r for r, method in runs.items() if self.METHODS[method]["policy"] == family]
            if not names:
                continue
            models = {sft: p("models", sft), **({"oracle": p("models", "oracle")} if family == "weak" else {})}
            models.update({r: p("models", r) for r in names})
            final.update(self._evaluate(models, sft, data, gen))
            if snapshots:
                for run in names:
                    curves[run] = self._curve(bench, seed, run, sft, gen, final)
        return final, curves

    def _curve(self, bench, seed, run, sft, gen, final):
        """{step: metrics} of ``run``'s saved snapshots on ``gen``'s prompts; step 0 is ``sft``, the last the run."""
        from openrlhf_sepo.evaluation import DataFlags

        p = lambda *x: bench.seed_path(seed, *x)  # noqa: E731
        steps = {0: p("models", sft), bench.steps: p("models", run)}
        ckpt = p("ckpt", run)
        for entry in os.listdir(ckpt) if os.path.isdir(ckpt) else []:
            if entry.startswith("global_step") and entry.endswith("_hf"):
                steps.setdefault(int(entry[len("global_step"):-3]), os.path.join(ckpt, entry))
        inner = {f"step{s}": path for s, path in sorted(steps.items()) if 0 < s < bench.steps}
        result = self._evaluate({sft: p("models", sft), **inner}, sft, DataFlags(apply_chat_template=True, max_len=128),
                                gen)
        curve = {int(k[4:]): v for k, v in result.items() if k.startswith("step")}
        curve[0], curve[bench.steps] = final[sft], final[run]
        return {s: curve[s] for s in sorted(curve)}

    # --- selection quality and token counts -----------------------------------------------------------
    def selection_stats(self, bench, seed):
        """Per selective run: precision / recall of its training selection against the planted key tokens of the
        side's sign (good key words in chosen answers, bad ones in rejected: the tokens the preference is about),
        and per run the response tokens whose log-probs enter its loss (all epochs); each scorer's (the oracle, and
        the token RM when one was trained) precision / recall at each k of K_VALUES; the base rate of those key
        tokens among response tokens."""
        selection = _Selection(bench, seed, self.token_signs)
        epochs = bench.size["policy_epochs"]
        key, n_tokens = selection.key, selection.n_tokens
        stats = {"precision": {}, "recall": {}, "training_tokens": {}, "base_rate": selection.n_key / n_tokens,
                 "oracle_precision": {}, "oracle_recall": {},
                 "mean_response_tokens": n_tokens / sum(len(ids) for ids in selection.lengths.values())}
        for method in bench.methods:
            spec = self.METHODS[method]
            if spec["trainer"] == "dpo":
                stats["training_tokens"][method] = n_tokens * epochs
                continue
            if spec["trainer"] == "ppo":  # trains on its own samples: no pair tokens to count
                continue
            if spec["trainer"] != "sepo":  # wmle, wmle_onpolicy, sft_chosen: every chosen token, weighted or not
                stats["training_tokens"][method] = len(key["chosen"]) * epochs
                continue
            if spec["selection"] == "confidence":  # chosen by the policy at each step: no fixed selection to score
                continue
            ds = selection.dataset(self.SCORES_DIRS[spec["scores"]], spec["k"], spec["selection"],
                                   spec["exclude_prefix"])
            assert len(ds) == len(selection.base), "every scores dir of a seed holds the same policy pairs"
            precision, recall, picked = selection.quality(ds)
            if spec["k"] < 1.0:
                stats["precision"][method], stats["recall"][method] = precision, recall
            # The NLL term reads every chosen token: selected rejected tokens + all chosen tokens.
            nll_tokens = len(key["chosen"]) + int(ds.selected["rejected"].sum())
            stats["training_tokens"][method] = (nll_tokens if spec["nll"] else picked) * epochs
        scorers = ["oracle"] + [sc for sc in ("token_rm", "oracle_x")
                                if os.path.isdir(bench.seed_path(seed, self.SCORES_DIRS[sc]))]
        for scorer in scorers:
            for k in self.K_VALUES:
                precision, recall, _ = selection.quality(selection.dataset(self.SCORES_DIRS[scorer], k, "per_response",
                                                                           False))
                stats.setdefault(f"{scorer}_precision", {})[str(k)] = precision
                stats.setdefault(f"{scorer}_recall", {})[str(k)] = recall
        return stats

    def report(self, bench, wall_s) -> dict:
        return keywords_report.write_report(bench)

    def _evaluate(self, models, baseline, data, gen) -> dict:
        """{model: the scalar metrics the demo reports} of ``evaluation.evaluate_models`` with the task's scorers (KL
        and win rate vs ``baseline``), three sample answers each; on the testbed also ``cue_rate``, the share of the
        answers' non-key words that are the spurious cue's."""
        from openrlhf_sepo.evaluation import evaluate_models

        if self.testbed is None:
            scorers = dict(reward_fn=tiny.ground_truth_rewards, format_fn=tiny.well_formed)
        else:
            task = testbed.Scorers(self.testbed)
            scorers = dict(reward_fn=task.rewards, format_fn=task.well_formed, with_prompts=True)
        result = evaluate_models(models, baseline=baseline, data=data, gen=gen, **scorers, reward_name="ground_truth",
                                 batch_size=32)
        out = {}
        for name, m in result["models"].items():
            out[name] = {
                "ground_truth_reward": m["reward_mean"],
                "format_validity": m["format_validity"],
                "kl_to_sft": m[f"kl_to_{baseline}"],
                "win_rate_vs_sft": m[f"win_rate_vs_{baseline}"],
                "gated_reward": gated_reward(m["samples"]),
                "credited_reward": credited_reward(m["samples"]),
                "samples": [s["response"] for s in m["samples"][:3]],
            }
            if self.testbed is not None:
                rates = task.cue_rates([s["response"] for s in m["samples"]])
                out[name]["cue_rate"] = sum(rates) / len(rates)
            if "pairwise_accuracy" in m:
                out[name]["pairwise_accuracy"] = m["pairwise_accuracy"]
        return out


class _Selection:
    """A seed's policy pairs with their planted key tokens of the side's sign (``key``: side -> bool per response
    token), and how a scores dir's selection finds them."""

    def __init__(self, bench, seed, token_signs):
        import numpy as np
        from transformers import AutoTokenizer

        from openrlhf_sepo.datasets import DataStrategy

        self.bench, self.seed = bench, seed
        self.tok = AutoTokenizer.from_pretrained(bench.seed_path(seed, "models", "sft"))
        self.strategy = DataStrategy(None, quiet=True)
        self.base = self.dataset("scores", 1.0, "per_response", False)
        self.key, self.lengths = {}, {}
        for side, sign in (("chosen", 1), ("rejected", -1)):
            ids = self.base.data[f"{side}_input_ids"]
            self.lengths[side] = [len(row) - p for row, p in zip(ids, self.base.prompt_lens)]
            self.key[side] = np.concatenate([token_signs(self.tok.convert_ids_to_tokens(row[p:]),
                                                         self.tok.decode(row[:p]))
                                             for row, p in zip(ids, self.base.prompt_lens)]) == sign
        self.n_key = sum(int(v.sum()) for v in self.key.values())
        self.n_tokens = sum(len(v) for v in self.key.values())

    def dataset(self, scores, k, selection, exclude_prefix):
        from openrlhf_sepo.datasets import TokenScoreDataset

        return TokenScoreDataset(self.bench.seed_path(self.seed, scores), self.tok, 128, self.strategy, k_chosen=k,
                                 k_rejected=k, selection=selection, exclude_common_prefix=exclude_prefix,
                                 seed=self.seed)

    def quality(self, ds):
        """(precision, recall, number selected) of ``ds``' selection against the key tokens."""
        hits = sum(int((ds.selected[s] & self.key[s]).sum()) for s in self.key)
        picked = sum(int(ds.selected[s].sum()) for s in self.key)
        return hits / picked, hits / self.n_key, picked



"""What the dense term costs in OpenRLHF's PPO: wall time per rollout token of dense PPO (RTO's oracle reward)
against bandit PPO, side by side in one run.

    python benchmarks/bench_ppo_dense.py [--rounds 2 --steps 6 --prompts 32 --new_tokens 64 --hidden 64 --layers 2]

Each round runs ``python -m openrlhf_sepo.cli.train_ppo_dense`` twice on the same tiny models, prompts and seed,
alternating the order: ``--dense.source none`` (OpenRLHF's bandit PPO) and ``--dense.source oracle`` (an oracle of
the policy's shape; its reference is PPO's own, reused, so the extra work is the oracle's forward per rollout). The
oracle is a second randomly initialised model: what it scores does not change what its forward costs. The
reward model and critic start from the base model (a random value head), as in tests/test_train_ppo_dense.py.

Per run, OpenRLHF's own step log ("Global step N: {...}") gives each step's ``timing/step_total`` (generation,
experience making, PPO updates, weight sync) and ``response_length`` (the mean rollout length); a step's cost per
rollout token is step_total / (response_length x prompts). The first step of a run is a warm-up and is dropped; the
median over the remaining steps is the run's figure. Printed: each run's figure, the per-round ratio dense / bandit
and the median ratio, also for ``timing/make_experience`` (where the dense forward runs) alone. Process start-up
(Ray and its workers, most of a launch on a CPU) is not a per-token cost and is reported apart. The goal (issue 19):
at most 1.3x per rollout token.
"""

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="bandit + dense pairs (order alternates per round)")
    p.add_argument("--steps", type=int, default=6, help="PPO steps per run (the first is a warm-up)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per rollout batch (= global train batch)")
    p.add_argument("--new_tokens", type=int, default=64, help="--rollout.max_new_tokens")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=None, help="write the figures as JSON here too")
    return p.parse_args(argv)


def steps_of(log: str) -> dict:
    """{global step: its status dict} from OpenRLHF's step lines; SystemExit on a non-finite value."""
    steps = {}
    for n, status in re.findall(r"Global step (\d+): (\{.*\})", log):
        try:
            steps[int(n)] = ast.literal_eval(status)
        except ValueError:
            raise SystemExit(f"step {n} logged a non-finite value: {status}") from None
    return steps


def per_token(steps: dict, prompts: int, key: str) -> float:
    """Median over the steps after the first of ``key`` seconds / rollout tokens of that step."""
    values = [s[key] / (s["response_length"] * prompts) for n, s in sorted(steps.items())[1:]]
    return statistics.median(values)


def build(workdir, args):
    """Tiny tokenizer, policy, oracle and prompts under ``workdir``; returns (base, oracle, prompts file)."""
    from openrlhf_sepo import tiny

    tok = os.path.join(workdir, "tokenizer")
    tiny.build_tokenizer(tok)
    base = tiny.build_model(os.path.join(workdir, "base"), tok, args.hidden, args.layers, seed=0)
    oracle = tiny.build_model(os.path.join(workdir, "oracle"), tok, args.hidden, args.layers, seed=1)
    prompts = os.path.join(workdir, "prompts.jsonl")
    with open(prompts, "w") as f:
        for row in tiny.make_prompts(args.prompts * args.steps, split="train"):
            f.write(json.dumps({"input": [{"role": "user", "content": row["prompt"]}]}) + "\n")
    return base, oracle, prompts


def run_once(source, base, oracle, prompts, workdir, args, name):
    cmd = [sys.executable, "-m", "openrlhf_sepo.cli.train_ppo_dense", "--dense.source", source,
           *(["--dense.oracle", oracle] if source == "oracle" else []),
           "--actor.model_name_or_path", base, "--reward.model_name_or_path", base,
           "--critic.model_name_or_path", base, "--data.prompt_dataset", prompts, "--data.input_key", "input",
           "--data.apply_chat_template", "--data.max_len", str(64 + args.new_tokens),
           "--rollout.max_new_tokens", str(args.new_tokens), "--rollout.batch_size", str(args.prompts),
           "--rollout.micro_batch_size", "8", "--train.batch_size", str(args.prompts), "--train.micro_batch_size", "8",
           "--train.max_epochs", "1", "--train.num_episodes", "1", "--train.seed", "0",
           "--actor.num_gpus_per_node", "1", "--critic.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
           "--reward.num_gpus_per_node", "1", "--vllm.num_engines", "1", "--vllm.sync_backend", "gloo",
           "--ds.attn_implementation", "sdpa", "--ds.zero_stage", "2", "--algo.advantage.estimator", "gae",
           "--actor.adam.lr", "1e-4", "--critic.adam.lr", "1e-4",
           "--ckpt.output_dir", os.path.join(workdir, name), "--ckpt.path", os.path.join(workdir, name + "_ckpt")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    steps = steps_of(proc.stdout)
    if len(steps) < 2:
        raise SystemExit(f"{name}: {len(steps)} step(s) logged; give --steps 2 or more")
    step_s = sum(s["timing/step_total"] for s in steps.values())
    return {"source": source, "launch_s": round(seconds, 1), "steps": len(steps),
            "startup_s": round(seconds - step_s, 1),
            "s_per_token": per_token(steps, args.prompts, "timing/step_total"),
            "experience_s_per_token": per_token(steps, args.prompts, "timing/make_experience"),
            "response_length": statistics.mean(s["response_length"] for s in steps.values())}


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        base, oracle, prompts = build(workdir, args)
        for r in range(args.rounds):
            order = ("none", "oracle") if r % 2 == 0 else ("oracle", "none")
            pair = {}
            for source in order:
                pair[source] = run_once(source, base, oracle, prompts, workdir, args, f"r{r}_{source}")
                x = pair[source]
                print(f"round {r} {source:<6} {x['steps']} steps, {x['s_per_token'] * 1e3:.3f} ms per rollout token "
                      f"(experience making {x['experience_s_per_token'] * 1e3:.3f}), mean response "
                      f"{x['response_length']:.1f} tokens; launch {x['launch_s']:.0f} s of which start-up and save "
                      f"{x['startup_s']:.0f} s", flush=True)
            results.append(pair)
    ratios = [p["oracle"]["s_per_token"] / p["none"]["s_per_token"] for p in results]
    exp = [p["oracle"]["experience_s_per_token"] / p["none"]["experience_s_per_token"] for p in results]
    print(f"dense/bandit: time per rollout token {statistics.median(ratios):.2f}x (per round: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; goal <= 1.3x); experience making alone "
          f"{statistics.median(exp):.2f}x (per round: {', '.join(f'{x:.2f}' for x in exp)})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": results, "ratio": statistics.median(ratios),
                       "experience_ratio": statistics.median(exp)}, f, indent=1)


if __name__ == "__main__":
    main()

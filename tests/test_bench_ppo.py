"""The demo harness's PPO arms (``keywords.KeywordSpec.ppo_job``, ``runner.Benchmark.run_each``): each arm's command
line is one ``train_ppo_dense`` accepts (its flags, the dense checks and the CPU runtime's checks all pass, up to
the point where Ray would start), and the one-process-per-job runner keeps the harness's done markers and stops with
the failing job's log. The PPO runs themselves are tested end to end in tests/test_train_ppo_dense.py."""

import json
import os
import shutil
import sys
import types

import pytest

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import testbed, token_rm
from openrlhf_sepo.bench.keywords import PPO_DENSE_COEF, TESTBED_SIZES, KeywordSpec
from openrlhf_sepo.bench.runner import Benchmark


def _bench(tmp_path, methods):
    """A Benchmark of the testbed spec over ``tmp_path`` without its constructor's settings file (the arms have none
    committed yet when this runs from a fresh sweep)."""
    bench = Benchmark.__new__(Benchmark)
    bench.spec = KeywordSpec(task="testbed", testbed_task=testbed.Task())
    bench.args = types.SimpleNamespace(nproc=2)
    bench.tag, bench.out, bench.size, bench.methods, bench.seeds = "demo", str(tmp_path), TESTBED_SIZES["full"], \
        methods, [0]
    return bench


class RayWouldStart(Exception):
    pass


@pytest.mark.parametrize("method", ["ppo", "ppo_dense", "ppo_dense_token_rm"])
def test_each_ppo_arm_is_a_command_line_train_ppo_dense_accepts(tiny_dir, tmp_path, monkeypatch, capsys, method):
    import ray

    from openrlhf_sepo.ppo_dense_run import run

    bench = _bench(tmp_path, [method])
    models = tmp_path / "seed0" / "models"
    models.mkdir(parents=True)
    for name in ("sft", "rm", "oracle"):  # every model the arms name: the tiny base model's files
        os.symlink(os.path.join(tiny_dir, "base"), models / name)
    # ... and for the token RM those files marked as train_token_rm marks its checkpoints (the dense check reads it)
    shutil.copytree(os.path.join(tiny_dir, "base"), models / "token_rm")
    config = json.loads((models / "token_rm" / "config.json").read_text())
    config[token_rm.CONFIG_KEY] = {"activation": "softplus", "aggregation": "mean", "tau": 2.0}
    (models / "token_rm" / "config.json").write_text(json.dumps(config))
    (tmp_path / "seed0" / "data").mkdir()
    os.symlink(os.path.join(tiny_dir, "pairs.jsonl"), tmp_path / "seed0" / "data" / "policy_pairs.jsonl")
    job = bench.spec.ppo_job(bench, 0, f"{method}__lr0.001", method, {"lr": 1e-3})
    assert job["module"] == "openrlhf_sepo.cli.train_ppo_dense" and job["name"] == f"seed0/{method}__lr0.001"

    def stop(*args, **kwargs):
        raise RayWouldStart(kwargs)

    monkeypatch.setattr(ray, "init", stop)
    saved = {n: m for n, m in sys.modules.items() if n == "vllm" or n.startswith("vllm.")}
    try:
        with pytest.raises(RayWouldStart):  # every check passed: train_ppo_ray's train() is starting Ray
            run(job["args"])
    finally:
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    out = capsys.readouterr().out
    dense = bench.spec.METHODS[method]["dense"]
    assert f"dense source: {dense}" in out
    args = job["args"]
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--actor.adam.lr") == flag("--critic.adam.lr") == "0.001"
    assert flag("--critic.model_name_or_path") == flag("--reward.model_name_or_path") == str(models / "rm")
    assert flag("--algo.advantage.estimator") == "gae"
    # The same rollouts in every arm: one answer per policy prompt per episode, policy_epochs episodes.
    assert flag("--train.num_episodes") == str(bench.size["policy_epochs"])
    assert flag("--rollout.n_samples_per_prompt") == "1" and flag("--rollout.batch_size") == "32"
    assert ("--dense.coef" in args) == (dense != "none")
    if dense != "none":
        assert flag("--dense.coef") == str(PPO_DENSE_COEF[dense])


@pytest.mark.slow  # starts (two tiny) subprocesses
def test_run_each_marks_done_skips_done_jobs_and_stops_at_a_failure_with_its_log(tmp_path, capsys):
    bench = _bench(tmp_path, ["ppo"])
    ok = bench.job(0, "ok", "json.tool", ["--help"])
    bad = bench.job(0, "bad", "openrlhf_sepo.no_such_module", [])
    bench.run_each("ppo", [ok])
    with open(ok["done"]) as f:
        assert float(f.read()) >= 0  # the job's wall seconds, which the report reads
    assert "usage" in open(ok["log"]).read()
    bench.run_each("ppo", [ok])
    assert "0 of 1 jobs to run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="launch ppo failed .* at job seed0/bad") as e:
        bench.run_each("ppo", [ok, bad])
    assert "No module named openrlhf_sepo.no_such_module" in str(e.value)
    assert not os.path.exists(bad["done"])

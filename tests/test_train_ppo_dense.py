"""train_ppo_dense: OpenRLHF's own Ray PPO (train_ppo_ray) with dense rewards, on this CPU machine.

In-process: bad flags (dense or what the CPU runtime cannot run) stop the run before Ray starts or a model loads,
with the engine named first; the ``ray.init`` arguments the CPU runtime adds (and that nothing is added on a machine
with CUDA and vLLM). Slow, two launches shared by the tests: (A) the launcher script on CPU with the RTO oracle
(3 PPO steps through generation by the vLLM stand-in, experience making with the oracle group, GAE, actor and
critic updates, weight sync, a checkpoint per step, the final model); (B) the entrypoint resuming from A's
checkpoint with ``--dense.source none`` (OpenRLHF's bandit PPO) for 3 more steps.
"""

import ast
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import openrlhf_sepo  # noqa: F401  (flash-attn placeholder before OpenRLHF)
from openrlhf_sepo import vllm_standin
from openrlhf_sepo.cpu import ray_ppo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "examples", "scripts", "train_ppo_dense_llama.sh")
REAL_VLLM = vllm_standin.vllm_installed()
ENGINE_LINE = ("[train_ppo_dense] generation engine: vLLM stand-in (HF generate; vllm not importable)"
               if not REAL_VLLM else "[train_ppo_dense] generation engine: vLLM ")


@pytest.fixture
def saved_vllm_modules():
    saved = {n: m for n, m in sys.modules.items() if n == "vllm" or n.startswith("vllm.")}
    yield
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
    sys.modules.update(saved)


# ------------------------------------------------------------------------------------------------ in-process

@pytest.mark.parametrize("extra, message", [
    (["--dense.source", "oracle"], "--dense.oracle"),  # ppo_dense's check: a source without its model
    (["--dense.source", "none", "--ds.attn_implementation", "flash_attention_2"], "flash-attn"),
    (["--dense.source", "oracle", "--dense.oracle", "{base}", "--train.async_enable"], "PPOTrainerAsync"),
    (["--dense.source", "none", "--vllm.num_engines", "0"], "--vllm.num_engines"),
    ([], "--dense.source"),  # required
])
def test_bad_flags_stop_before_ray_starts(tiny_dir, saved_vllm_modules, monkeypatch, capsys, extra, message):
    import ray

    from openrlhf_sepo.ppo_dense_run import run

    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", must_not_start)
    base = os.path.join(tiny_dir, "base")
    flags = ["--actor.model_name_or_path", base, "--reward.model_name_or_path", base, "--vllm.num_engines", "1",
             "--ds.attn_implementation", "sdpa", *[f.format(base=base) for f in extra]]
    assert run(flags) == 2
    out, err = capsys.readouterr()
    assert message in err and not ray.is_initialized()
    if "--dense.source" in extra:
        assert out.startswith(ENGINE_LINE)  # the engine is named before anything else


def _args(**groups):
    from openrlhf.utils.config import hierarchize

    flat = {"actor.num_nodes": 1, "actor.num_gpus_per_node": 2, "critic.num_nodes": 1, "critic.num_gpus_per_node": 1,
            "ref.num_nodes": 1, "ref.num_gpus_per_node": 1, "reward.num_nodes": 1, "reward.num_gpus_per_node": 1,
            "reward.remote_url": None, "algo.kl.init_coef": 0.01, "vllm.num_engines": 1,
            "vllm.tensor_parallel_size": 1, **groups}
    return hierarchize(SimpleNamespace(**flat))


def test_the_cpu_runtime_adds_logical_gpus_and_the_worker_hook(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv(ray_ppo.WORKER_NICENESS_ENV, "3")  # the user's choice is kept
    update = ray_ppo.ray_init_update(ray_ppo.Runtime(cpu=True, standin=True), _args)
    kwargs = update({"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "true"}}})
    assert kwargs["num_gpus"] == 2 + 1 + 1 + 1 + 1 + 2 * 1 and kwargs["num_cpus"] == kwargs["num_gpus"] + 2
    env = kwargs["runtime_env"]["env_vars"]
    assert kwargs["runtime_env"]["worker_process_setup_hook"] == ray_ppo.SETUP_HOOK
    assert env["TOKENIZERS_PARALLELISM"] == "true" and env[ray_ppo.STANDIN_ENV] == "1"  # OpenRLHF's env vars kept
    assert env["PYTHONPATH"].split(os.pathsep) == [REPO, "/elsewhere"] and env["DS_ACCELERATOR"] == "cpu"
    assert os.environ[ray_ppo.WORKER_NICENESS_ENV] == "3" and kwargs["include_dashboard"] is False
    assert ray_ppo.logical_gpus(_args(**{"algo.kl.init_coef": 0, "reward.remote_url": ["http://rm"]})) == 2 + 1 + 1 + 2
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # joining a running cluster: its resources are its own
    joined = update({})
    assert "num_gpus" not in joined and joined["runtime_env"]["worker_process_setup_hook"] == ray_ppo.SETUP_HOOK


def test_nothing_is_added_on_a_machine_with_cuda_and_vllm():
    kwargs = {"runtime_env": {"env_vars": {"NCCL_DEBUG": "WARN"}}}
    assert ray_ppo.ray_init_update(ray_ppo.Runtime(cpu=False, standin=False), _args)(dict(kwargs)) == kwargs
    gpu_without_vllm = ray_ppo.ray_init_update(ray_ppo.Runtime(cpu=False, standin=True), _args)(dict(kwargs))
    assert "num_gpus" not in gpu_without_vllm and gpu_without_vllm["runtime_env"]["worker_process_setup_hook"]


# ------------------------------------------------------------------------------------------------ two launches

def _steps(log: str) -> dict:
    """{global step: its logged status} from OpenRLHF's "Global step N: {...}" lines; a NaN / inf fails here."""
    steps = {}
    for n, status in re.findall(r"Global step (\d+): (\{.*\})", log):
        try:
            steps[int(n)] = ast.literal_eval(status)
        except ValueError:
            raise AssertionError(f"step {n} logged a non-finite value: {status}") from None
    return steps


def _launch(run_in_own_group, cmd, env=None, timeout=1200):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                       if p])
    start = time.time()
    proc = run_in_own_group(cmd, timeout, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexited {proc.returncode}:\n{proc.stdout[-8000:]}"
    return SimpleNamespace(log=proc.stdout, seconds=time.time() - start, steps=_steps(proc.stdout))


@pytest.fixture(scope="module")
def ppo_setup(tiny_dir, tmp_path_factory):
    """Prompts, an oracle (another tiny Llama of the same tokenizer), the flags both launches share."""
    import json

    from openrlhf_sepo import tiny

    out = tmp_path_factory.mktemp("ppo_dense")
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": [{"role": "user", "content": r["prompt"]}]}) + "\n"
                               for r in tiny.make_prompts(12, split="train")))
    oracle = tiny.build_model(str(out / "oracle"), os.path.join(tiny_dir, "tokenizer"), seed=1)
    base = os.path.join(tiny_dir, "base")
    flags = [
        "--actor.model_name_or_path", base, "--reward.model_name_or_path", base,
        "--data.prompt_dataset", str(prompts), "--data.input_key", "input", "--data.apply_chat_template",
        "--data.max_len", "96", "--data.max_samples", "12", "--rollout.max_new_tokens", "12",
        "--rollout.batch_size", "4", "--rollout.micro_batch_size", "2", "--train.batch_size", "4",
        "--train.micro_batch_size", "2", "--ds.zero_stage", "2",
        # a large actor lr with no warm-up moves the policy far at every step, so an engine whose weights were not
        # synced would sample from another distribution than the actor's (vllm_kl, logged with the IS correction)
        "--actor.adam.lr", "1e-2", "--actor.lr_warmup_ratio", "0", "--critic.adam.lr", "1e-3",
        "--algo.advantage.is_correction_level", "token",
        "--ckpt.path", str(out / "ckpt"), "--ckpt.output_dir", str(out / "final"), "--ckpt.save_steps", "1",
    ]
    return SimpleNamespace(dir=out, oracle=oracle, flags=flags)


@pytest.fixture(scope="module")
def launch_a(ppo_setup, run_in_own_group):
    """The launcher on CPU, RTO oracle, 3 steps, a checkpoint per step."""
    launch = _launch(run_in_own_group, ["bash", LAUNCHER, *ppo_setup.flags, "--dense.oracle", ppo_setup.oracle,
                                        "--logger.tensorboard_dir", str(ppo_setup.dir / "tb")],
                     env={"SEPO_DEVICE": "cpu"})
    # B writes into the same checkpoint dir (keeping the newest --ckpt.max_num): what A left, read now
    launch.checkpoints = {part: sorted(os.listdir(ppo_setup.dir / "ckpt" / part)) for part in ("_actor", "_critic")}
    return launch


@pytest.fixture(scope="module")
def launch_b(launch_a, ppo_setup, run_in_own_group):
    """The entrypoint, resuming A's checkpoint as OpenRLHF's bandit PPO (--dense.source none) for a 2nd episode."""
    cpu = ["--actor.num_gpus_per_node", "1", "--critic.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
           "--reward.num_gpus_per_node", "1", "--vllm.num_engines", "1", "--vllm.sync_backend", "gloo",
           "--ds.attn_implementation", "sdpa"]
    return _launch(run_in_own_group, [sys.executable, "-m", "openrlhf_sepo.cli.train_ppo_dense", "--dense.source",
                                      "none", *cpu, *ppo_setup.flags, "--ckpt.load_enable", "--train.num_episodes", "2"])


def _report(name, launch):
    """The launch's wall time and per-step numbers, printed (seen with -s)."""
    def column(key, fmt):
        return ", ".join(format(status.get(key, float("nan")), fmt) for status in launch.steps.values())

    print(f"\n[{name}] launch {launch.seconds:.0f} s, steps {sorted(launch.steps)}; step_total "
          f"{column('timing/step_total', '.2f')} s; vllm_kl {column('vllm_kl', '.1e')}; kl {column('kl', '.1e')}")


@pytest.mark.slow
def test_the_log_names_the_engine_and_the_dense_source(launch_a, launch_b):
    for launch in (launch_a, launch_b):
        assert launch.log.count(ENGINE_LINE) == 1
    assert "[train_ppo_dense] dense source: oracle (dense groups: oracle); trainer: DensePPOTrainer" in launch_a.log
    assert "[train_ppo_dense] dense source: none (dense groups: none); trainer: DensePPOTrainer" in launch_b.log
    assert "(RolloutRayActor pid=" in launch_a.log  # OpenRLHF's own rollout actor ran the (stand-in) engine


@pytest.mark.slow
def test_oracle_ppo_runs_three_finite_steps_with_synced_engine_weights(launch_a, ppo_setup, tb_scalars):
    _report("A: launcher, oracle", launch_a)
    assert sorted(launch_a.steps) == [1, 2, 3]
    for n, status in launch_a.steps.items():
        numbers = {k: v for k, v in status.items() if isinstance(v, (int, float))}
        assert all(math.isfinite(v) for v in numbers.values()), (n, status)
        for key in ("policy_loss", "critic_loss", "dense_reward", "dense_abs_mean", "vllm_kl", "timing/broadcast"):
            assert key in status, (n, key)
        assert status["dense_abs_mean"] > 0  # the oracle differs from the reference
        # The engine samples from the actor's current weights: its log-probs match the actor's (bf16 noise) ...
        assert abs(status["vllm_kl"]) < 1e-2, (n, status["vllm_kl"])
    # ... while the actor has moved far from where it started (the engine would be as far without the sync).
    assert abs(launch_a.steps[3]["kl"]) > 10 * abs(launch_a.steps[3]["vllm_kl"])
    for tag, points in tb_scalars(str(ppo_setup.dir / "tb")).items():
        assert all(math.isfinite(v) for _, v in points), tag
    for part in ("_actor", "_critic"):  # a checkpoint per step (--ckpt.save_steps 1)
        assert {"global_step1", "global_step2", "global_step3", "latest"} <= set(launch_a.checkpoints[part]), part
    assert os.path.exists(ppo_setup.dir / "final" / "model.safetensors")


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_as_bandit_ppo(launch_b, ppo_setup):
    _report("B: resume, none", launch_b)
    assert os.path.isdir(ppo_setup.dir / "ckpt" / "_actor" / "global_step6")
    assert "Loading the checkpoint" in launch_b.log and "/_actor" in launch_b.log and "/_critic" in launch_b.log
    assert sorted(launch_b.steps) == [4, 5, 6]  # global steps go on; the first episode is not replayed
    for n, status in launch_b.steps.items():
        assert "dense_reward" not in status and "policy_loss" in status
        assert abs(status["vllm_kl"]) < 1e-2, (n, status["vllm_kl"])  # weights broadcast after loading

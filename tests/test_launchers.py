"""examples/scripts launchers: the GPU command they would run, slurm preparation, and real CPU runs
(SEPO_DEVICE=cpu, 2 gloo ranks) of the SFT and DPO stages with tiny-model overrides. The Ray PPO launcher
(train_ppo_dense_llama.sh, SEPO_LAUNCHER=ray) runs one driver process; its real CPU run is in test_train_ppo_dense.py."""

import glob
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(p for p in glob.glob(os.path.join(REPO, "examples", "scripts", "*_llama.sh")))


def _is_ray(script):
    with open(script) as f:
        return "SEPO_LAUNCHER=ray" in f.read()


RAY_SCRIPTS = [s for s in SCRIPTS if _is_ray(s)]
DEEPSPEED_SCRIPTS = [s for s in SCRIPTS if not _is_ray(s)]


@pytest.fixture
def bash(run_in_own_group):
    """``bash(script, args, **env)``: run a launcher with ``env`` on top of this one's (the rendezvous variables
    dropped), stdout and stderr together; on timeout its whole process group is killed, torchrun ranks included."""
    def run(script, args, **env):
        full_env = {**os.environ, "PYTHON": sys.executable, **env}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            full_env.pop(var, None)
        return run_in_own_group(["bash", script, *args], 900, env=full_env, cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("script", DEEPSPEED_SCRIPTS, ids=os.path.basename)
def test_gpu_command_is_deepspeed_with_user_arguments_last(script, bash):
    proc = bash(script, ["--data.max_len", "77"], SEPO_DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[:2] == ["deepspeed", "--module"] and cmd[-2:] == ["--data.max_len", "77"]
    assert "flash_attention_2" in cmd and "bf16" in cmd  # the published GPU defaults


@pytest.mark.slow
@pytest.mark.parametrize("script", DEEPSPEED_SCRIPTS, ids=os.path.basename)
def test_cpu_command_uses_runtime_and_sdpa(script, bash):
    proc = bash(script, ["--ds.attn_implementation", "eager"], SEPO_DRY_RUN="1", SEPO_DEVICE="cpu", SEPO_NPROC="3")
    assert proc.returncode == 0, proc.stdout
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3"]
    assert cmd[cmd.index("-m", 2) + 1] == "openrlhf_sepo.cpu"
    impls = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--ds.attn_implementation"]
    assert impls[-2:] == ["sdpa", "eager"]  # sdpa replaces flash_attention_2; the user's choice still wins


def test_the_ray_ppo_launcher_is_found():
    assert [os.path.basename(s) for s in RAY_SCRIPTS] == ["train_ppo_dense_llama.sh"]


@pytest.mark.slow
@pytest.mark.parametrize("script", RAY_SCRIPTS, ids=os.path.basename)
def test_ray_gpu_command_is_one_driver_with_user_arguments_last(script, bash):
    proc = bash(script, ["--data.max_len", "77"], SEPO_DRY_RUN="1")
    assert proc.returncode == 0, proc.stdout
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[:3] == [sys.executable, "-m", "openrlhf_sepo.cli.train_ppo_dense"] and cmd[-2:] == ["--data.max_len", "77"]
    assert "flash_attention_2" in cmd and "bf16" in cmd and "gloo" not in cmd  # the published GPU defaults
    assert "--dense.source" in cmd


@pytest.mark.slow
@pytest.mark.parametrize("source, flags", [
    ("oracle", ["--dense.source", "oracle", "--dense.oracle", "./checkpoint/tinyllama-dpo-oracle"]),
    ("token_rm", ["--dense.source", "token_rm", "--dense.token_rm", "./checkpoint/tinyllama-token-rm"]),
    ("none", ["--dense.source", "none"])])
def test_the_ppo_launcher_passes_only_the_chosen_dense_sources_flags(source, flags, bash):
    """check_dense_flags refuses a model path of another source, so DENSE_SOURCE picks the flags, not overrides."""
    script, = RAY_SCRIPTS
    proc = bash(script, [], SEPO_DRY_RUN="1", DENSE_SOURCE=source)
    assert proc.returncode == 0, proc.stdout
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert [a for a in cmd if a.startswith("--dense.")] == [f for f in flags if f.startswith("--dense.")]
    assert cmd[cmd.index("--dense.source") + 1] == source and all(f in cmd for f in flags)
    bad = bash(script, [], SEPO_DRY_RUN="1", DENSE_SOURCE="oracel")
    assert bad.returncode == 2 and "DENSE_SOURCE" in bad.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", RAY_SCRIPTS, ids=os.path.basename)
def test_ray_cpu_command_has_cpu_settings_before_the_users(script, bash):
    proc = bash(script, ["--ds.attn_implementation", "eager", "--vllm.num_engines", "2"], SEPO_DRY_RUN="1",
                SEPO_DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert cmd[:3] == [sys.executable, "-m", "openrlhf_sepo.cli.train_ppo_dense"]

    def values(flag):
        return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]

    assert values("--ds.attn_implementation")[-2:] == ["sdpa", "eager"]  # the user's choice still wins
    assert values("--vllm.num_engines")[-1] == "2" and values("--vllm.sync_backend")[-1] == "gloo"
    for group in ("actor", "critic", "ref", "reward"):
        assert values(f"--{group}.num_gpus_per_node")[-1] == "1"
    proc = bash(script, [], SEPO_DRY_RUN="1", HOSTFILE="hosts")
    assert proc.returncode == 2 and "RAY_ADDRESS" in proc.stdout


@pytest.mark.slow
def test_slurm_mode_only_prepares_the_command():
    script = os.path.join(REPO, "examples", "scripts", "train_sft_llama.sh")
    proc = subprocess.run(["bash", "-c", f'source {shlex.quote(script)} slurm --adam.lr 3e-6; echo "${{SEPO_CMD[@]}}"'],
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[0] == "openrlhf.cli.train_sft" and cmd[-2:] == ["--adam.lr", "3e-6"]


@pytest.mark.slow
def test_cpu_sft_then_dpo_launchers_run_end_to_end(tiny_dir, tmp_path, bash):
    data = ["--data.max_len", "128", "--data.max_samples", "32", "--train.batch_size", "8",
            "--train.micro_batch_size", "2", "--adam.lr", "1e-3"]
    sft = str(tmp_path / "sft")
    proc = bash(os.path.join(REPO, "examples", "scripts", "train_sft_llama.sh"), [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"),
        "--data.dataset", os.path.join(tiny_dir, "sft.jsonl"), "--data.dataset_split", "train", *data,
        "--ckpt.output_dir", sft, "--ckpt.path", str(tmp_path / "ckpt_sft"),
    ], SEPO_DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert os.path.exists(os.path.join(sft, "model.safetensors"))

    oracle = str(tmp_path / "oracle")
    proc = bash(os.path.join(REPO, "examples", "scripts", "train_dpo_llama.sh"), [
        "--model.model_name_or_path", sft, "--ref.model_name_or_path", sft,
        "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--data.dataset_split", "train", *data,
        "--ckpt.output_dir", oracle, "--ckpt.path", str(tmp_path / "ckpt_dpo"),
    ], SEPO_DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert os.path.exists(os.path.join(oracle, "model.safetensors"))
    assert "openrlhf_sepo.cpu openrlhf.cli.train_dpo" in proc.stdout  # the launch line bash echoed (set -x)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_dpo_llama.sh", "train_sft_llama.sh", "score_tokens_llama.sh"])
def test_own_dataset_drops_the_default_split_unless_one_is_given(script, bash):
    path = os.path.join(REPO, "examples", "scripts", script)

    def data_flags(*args):
        proc = bash(path, list(args), SEPO_DRY_RUN="1")
        assert proc.returncode == 0, proc.stdout
        cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
        return [(a, cmd[i + 1]) for i, a in enumerate(cmd) if a in ("--data.dataset", "--data.dataset_split")]

    default_split = [v for a, v in data_flags() if a == "--data.dataset_split"]
    assert default_split in (["train_prefs"], ["train_sft"])  # the published data set keeps its split
    # The user's own file, no split: the default data set's split is dropped (OpenRLHF's "train" applies).
    assert [v for a, v in data_flags("--data.dataset", "pairs.jsonl") if a == "--data.dataset_split"] == []
    assert ("--data.dataset", "pairs.jsonl") in data_flags("--data.dataset", "pairs.jsonl")
    # An explicit split is kept, in either order and spelling (last, so it wins over the default's).
    assert data_flags("--data.dataset_split", "test", "--data.dataset", "pairs.jsonl")[-2:] == [
        ("--data.dataset_split", "test"), ("--data.dataset", "pairs.jsonl")]
    proc = bash(path, ["--data.dataset=pairs.jsonl", "--data.dataset_split=test"], SEPO_DRY_RUN="1")
    assert proc.returncode == 0 and proc.stdout.split()[-2:] == ["--data.dataset=pairs.jsonl", "--data.dataset_split=test"]
    # A split alone (the default data set, another split) is kept too.
    assert data_flags("--data.dataset_split", "test_prefs")[-1] == ("--data.dataset_split", "test_prefs")


@pytest.mark.slow
def test_cpu_dpo_launcher_with_a_local_file_and_no_split(tiny_dir, tmp_path, bash):
    # Before the fix: AttributeError: 'DatasetDict' object has no attribute 'select' (split train_prefs kept).
    base, out = os.path.join(tiny_dir, "base"), str(tmp_path / "dpo")
    proc = bash(os.path.join(REPO, "examples", "scripts", "train_dpo_llama.sh"), [
        "--model.model_name_or_path", base, "--ref.model_name_or_path", base,
        "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--data.max_len", "128", "--data.max_samples", "16",
        "--train.batch_size", "8", "--train.micro_batch_size", "2",
        "--ckpt.output_dir", out, "--ckpt.path", str(tmp_path / "ckpt"),
    ], SEPO_DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert os.path.exists(os.path.join(out, "model.safetensors")) and "train_prefs" not in proc.stdout

"""Shared fixtures: tiny models and data built locally (nothing downloaded), and a launcher for
OpenRLHF-style entrypoints through the CPU runtime with 1 or N gloo ranks."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PYTHON), "torchrun")

# Small, fast settings every tiny OpenRLHF run on CPU shares.
TINY_TRAIN_FLAGS = [
    "--ds.attn_implementation", "sdpa",
    "--data.max_len", "128",
    "--train.micro_batch_size", "4",
    "--train.batch_size", "8",
    "--data.dataloader_num_workers", "0",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tokenizer/, base/ (random tiny Llama), sft.jsonl, pairs.jsonl (UltraFeedback shape), pairs_plain.jsonl."""
    from openrlhf_sepo import tiny

    out = str(tmp_path_factory.mktemp("tiny"))
    tiny.main([out, "--n_sft", "64", "--n_pairs", "48"])
    return out


def run_module(module, args, nproc=1, cwd=None, env=None, timeout=900, check=True):
    """Run ``python -m openrlhf_sepo.cpu MODULE ARGS`` (nproc=1) or the same under torchrun (nproc>1).

    Returns the CompletedProcess with stdout+stderr in ``.stdout``; on failure (check=True) the output is
    shown in the assertion message.
    """
    if nproc == 1:
        cmd = [PYTHON, "-m", "openrlhf_sepo.cpu", module, *args]
    else:
        cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
               "-m", "openrlhf_sepo.cpu", module, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if env is None or var not in env:
            full_env.pop(var, None)
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\nexited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc


def _free_port():
    from openrlhf_sepo.cpu import free_port

    return free_port()


@pytest.fixture(scope="session")
def run():
    return run_module


@pytest.fixture(scope="session")
def tiny_flags():
    """Small, fast OpenRLHF flags for tiny CPU runs: sdpa, max_len 128, micro batch 4, global batch 8."""
    return list(TINY_TRAIN_FLAGS)

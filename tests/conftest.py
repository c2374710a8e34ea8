"""Shared fixtures: tiny models and data built locally (nothing downloaded), a launcher for OpenRLHF-style
entrypoints through the CPU runtime with 1 or N gloo ranks, score dirs in the score_tokens format, and a
TensorBoard scalar reader. (Tests run with --import-mode=importlib: share helpers through fixtures, not imports.)"""

import contextlib
import glob
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

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
    proc = _run_in_own_group(cmd, timeout, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\nexited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc


def _run_in_own_group(cmd, timeout, **popen_kwargs):
    """``subprocess.run(cmd, timeout=timeout, **popen_kwargs)``, but in a session of its own whose whole process group
    is killed on timeout: subprocess.run kills only ``cmd``, and a timed-out demo or launcher left its torchrun ranks
    or Ray workers running, orphaned, through the rest of the suite."""
    with subprocess.Popen(cmd, start_new_session=True, **popen_kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def run_in_own_group():
    """``_run_in_own_group`` for the tests that start long commands themselves."""
    return _run_in_own_group


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


def tokenize_pairs(tiny_dir, max_len=128):
    """(tokenizer, [(prompt_len, chosen_ids, rejected_ids)]) exactly as OpenRLHF's RewardDataset(is_dpo=True) makes
    them from the tiny UltraFeedback-shaped pairs. The strategy is the package's DataStrategy: RewardDataset reads only its args."""
    import datasets
    from openrlhf.datasets import RewardDataset
    from openrlhf.utils import get_tokenizer

    from openrlhf_sepo.rows import DataStrategy

    tokenizer = get_tokenizer(os.path.join(tiny_dir, "tokenizer"), None, "right", None)
    data_args = SimpleNamespace(prompt_key=None, chosen_key="chosen", rejected_key="rejected",
                                apply_chat_template=True, tokenizer_chat_template=None)
    rows = datasets.load_dataset("json", data_files=os.path.join(tiny_dir, "pairs.jsonl"), split="train")
    reward = RewardDataset(rows, tokenizer, max_len, DataStrategy(data_args, quiet=True),
                           is_dpo=True, num_processors=1)
    pairs = []
    for i in range(len(reward)):
        chosen_ids, _, rejected_ids, _, prompt_len = reward[i]
        pairs.append((prompt_len, chosen_ids[0].tolist(), rejected_ids[0].tolist()))
    return tokenizer, pairs


@pytest.fixture(scope="session")
def tiny_pairs(tiny_dir):
    """(tokenizer, [(prompt_len, chosen_ids, rejected_ids)]) of tiny_dir's pairs.jsonl at max_len 128, as OpenRLHF's
    RewardDataset(is_dpo=True) tokenizes them. Shared by the session: do not mutate."""
    return tokenize_pairs(tiny_dir)


def _write_score_dir(out, tokenizer, pairs, score_fn, max_len=128, fingerprint=None):
    """A scores dir written by openrlhf_sepo.scores_dir (one shard, a complete manifest); score_fn(ids, prompt_len,
    side) -> one score per response token, side being "chosen" or "rejected". fingerprint overrides the tokenizer's
    in the manifest. Returns out."""
    from openrlhf_sepo import scores_dir
    from openrlhf_sepo.scoring import tokenizer_fingerprint

    records = [
        {"index": i, "prompt_len": p, "chosen_input_ids": c, "rejected_input_ids": r,
         "chosen_scores": score_fn(c, p, "chosen"), "rejected_scores": score_fn(r, p, "rejected")}
        for i, (p, c, r) in enumerate(pairs)
    ]
    manifest = scores_dir.new_manifest({
        "complete": True, "tokenizer": {"name_or_path": tokenizer.name_or_path,
                                        "fingerprint": fingerprint or tokenizer_fingerprint(tokenizer)},
        "data": {"max_len": max_len}})
    scores_dir.start_run(out, manifest)
    scores_dir.write_shard(out, 0, records, {"shard": 0, "first_index": 0, "pairs_kept": len(records)})
    return out


@pytest.fixture(scope="session")
def write_score_dir():
    """write_score_dir(out, tokenizer, pairs, score_fn, max_len=128, fingerprint=None) -> out: a scores dir in the
    score_tokens format, written by openrlhf_sepo.scores_dir (one parquet shard + a complete manifest);
    score_fn(ids, prompt_len, side) gives one score per response token."""
    return _write_score_dir


def _tb_scalars(tb_dir):
    """{tag: [(step, value), ...]} from every TensorBoard events file under tb_dir (recursively): files in sorted
    path order, each file's events in the order written (so a single run's steps come in order; nothing is re-sorted,
    so repeated or out-of-order steps stay visible)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            logs.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return logs


@pytest.fixture(scope="session")
def tb_scalars():
    """tb_scalars(tb_dir) -> {tag: [(step, value), ...]} over every events file under tb_dir."""
    return _tb_scalars




@pytest.fixture
def no_model_loads(monkeypatch):
    """A trainer's ``main(argv)`` in this process: OpenRLHF's strategy as ``get_strategy`` builds it (no distributed
    set-up) and model loaders that raise (OpenRLHF's Actor, and the token RM's), so a run that gets as far as
    loading a model fails the test: "stops before the model loads" is proven, not inferred from a printout."""
    from openrlhf.utils import get_strategy

    from openrlhf_sepo import token_rm_trainer, training

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(training, "setup_strategy", get_strategy)
    monkeypatch.setattr(training, "load_actor", must_not_load)
    monkeypatch.setattr(token_rm_trainer, "load_for_training", must_not_load)

# The fast tier (`-m "not slow"`) is in-process by construction: a test not marked slow that starts a
# subprocess or a multiprocessing worker, in its setup or its body, fails and names the marker to add.
@contextlib.contextmanager
def _in_process_only(item):
    import multiprocessing.process

    if item.get_closest_marker("slow") is not None:
        yield
        return

    execute_child, start = subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start

    def refuse(*args, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a subprocess: mark it @pytest.mark.slow")

    def launch_or_refuse(popen, cmd, *args, **kwargs):
        # Libraries probe the host at import (platform.architecture runs `file`); what the tier forbids is a
        # launch of Python, torchrun or a shell (an entrypoint, a launcher script).
        program = os.path.basename(str(cmd[0] if isinstance(cmd, (list, tuple)) else cmd).split()[0])
        if program.startswith(("python", "torchrun", "bash", "sh", "deepspeed", "ray")):
            refuse()
        return execute_child(popen, cmd, *args, **kwargs)

    subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start = launch_or_refuse, refuse
    try:
        yield
    finally:
        subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start = execute_child, start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _in_process_only(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _in_process_only(item):
        yield

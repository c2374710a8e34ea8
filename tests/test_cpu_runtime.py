"""The CPU runtime's pieces: rendezvous defaults, the scoped CUDA->CPU redirection, the no-GPU-change
guarantee, the flash-attn kernel placeholder, and the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from openrlhf_sepo import cpu
from openrlhf_sepo import openrlhf_internals as internals
from openrlhf_sepo.openrlhf_internals import cuda_calls_on_cpu
from openrlhf_sepo._flash_attn import FlashAttnUnavailableError, install_placeholder


def test_single_process_rendezvous_sets_variables(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert cpu.set_single_process_rendezvous() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_launcher_variables_are_left_alone(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "12345")
    assert cpu.set_single_process_rendezvous() is False
    assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "12345"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only redirection")
def test_cuda_calls_are_redirected_only_inside_the_block():
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()
    with cuda_calls_on_cpu():
        assert torch.cuda.current_device() == "cpu"
        torch.cuda.set_device(0)
        torch.cuda.synchronize()
        assert torch.ones(1).to(torch.cuda.current_device()).device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()


@pytest.fixture
def strategy_class(monkeypatch):
    """OpenRLHF's deepspeed module, its ``DeepspeedStrategy`` and ``init_device_mesh`` restored after the test (the
    patch changes them for the whole process)."""
    from openrlhf.utils.deepspeed import deepspeed as module

    for name in internals.CUDA_METHODS:
        monkeypatch.setattr(module.DeepspeedStrategy, name, vars(module.DeepspeedStrategy)[name])
    monkeypatch.setattr(module.DeepspeedStrategy, internals._PATCHED_FLAG, False, raising=False)
    monkeypatch.setattr(module, "init_device_mesh", module.init_device_mesh)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only patches")
def test_patch_wraps_exactly_the_cuda_spots_and_is_idempotent(strategy_class):
    m = strategy_class
    if getattr(m.DeepspeedStrategy.setup_distributed, "__wrapped__", None) is not None:  # patched before the fixture
        for name in internals.CUDA_METHODS:
            setattr(m.DeepspeedStrategy, name, getattr(m.DeepspeedStrategy, name).__wrapped__)
        m.init_device_mesh = m.init_device_mesh.__wrapped__
    before = {n: getattr(m.DeepspeedStrategy, n) for n in vars(m.DeepspeedStrategy) if n != internals._PATCHED_FLAG}
    assert cpu.patch_openrlhf_for_cpu() and cpu.patch_openrlhf_for_cpu()
    changed = sorted(n for n in before
                     if not n.startswith("__") and getattr(m.DeepspeedStrategy, n) is not before[n])
    assert changed == ["all_gather", "all_reduce", "save_ckpt", "save_model", "setup_distributed"]
    assert m.init_device_mesh.__wrapped__.__module__ == "torch.distributed.device_mesh"
    assert not hasattr(m.init_device_mesh.__wrapped__, "__wrapped__")  # wrapped once: the patch is idempotent


def test_patch_changes_nothing_when_cuda_is_present(strategy_class, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    m = strategy_class
    before, mesh = dict(vars(m.DeepspeedStrategy)), m.init_device_mesh
    assert cpu.patch_openrlhf_for_cpu() is False
    assert dict(vars(m.DeepspeedStrategy)) == before and m.init_device_mesh is mesh


def test_flash_attn_placeholder_lets_openrlhf_import_and_names_the_fix():
    assert install_placeholder() is True  # flash-attn's Python layer is installed, its kernels are not
    import openrlhf.models  # noqa: F401  imports flash_attn.bert_padding at import time
    from flash_attn import flash_attn_func

    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(FlashAttnUnavailableError) as err:
        flash_attn_func(q, q, q)
    message = str(err.value)
    assert "--ds.attn_implementation sdpa" in message and "--ds.packing_samples" in message
    assert "flash_attn::_flash_attn_forward" in message
    import flash_attn_2_cuda  # the stand-in itself: any kernel attribute raises the same error

    with pytest.raises(FlashAttnUnavailableError, match="--ds.attn_implementation sdpa"):
        flash_attn_2_cuda.varlen_fwd


def test_cli_usage_errors(capsys, monkeypatch):
    from openrlhf_sepo.cpu import __main__ as entry

    assert entry.main([]) == 2 and "usage: python -m openrlhf_sepo.cpu MODULE" in capsys.readouterr().err
    monkeypatch.setattr(entry, "set_single_process_rendezvous", lambda: False)  # no process-wide changes here
    monkeypatch.setattr(entry, "patch_openrlhf_for_cpu", lambda: False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_module sets it
    with pytest.raises(ImportError, match="No module named no_such_module_xyz"):
        entry.main(["no_such_module_xyz"])


@pytest.mark.slow
def test_jobs_batch_runs_in_order_logs_marks_done_skips_and_stops_at_a_failure(tmp_path):
    """``--jobs``: each job runs as ``python -m MODULE ARGS`` in this process, its output goes to its log, its
    ``done`` file gets its wall seconds, a finished job is skipped on a rerun, and a failing job stops the batch
    with its exit status (the job after it never runs)."""
    data = tmp_path / "in.json"
    data.write_text('{"b": 1, "a": 2}')

    def job(name, path, done=True):
        return {"name": name, "module": "json.tool", "args": ["--sort-keys", str(path)],
                "log": str(tmp_path / f"{name}.log"), "done": str(tmp_path / f"{name}.done") if done else None}

    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([job("first", data), job("second", data)]))
    cmd = [sys.executable, "-m", "openrlhf_sepo.cpu", "--jobs", str(jobs)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index("[jobs] first: done") < proc.stdout.index("[jobs] second: done")
    assert json.loads((tmp_path / "first.log").read_text()) == {"a": 2, "b": 1}
    assert '"a": 2' not in proc.stdout  # the job's own output went to its log only
    assert float((tmp_path / "second.done").read_text()) >= 0

    jobs.write_text(json.dumps([job("first", data), job("broken", tmp_path / "missing.json", done=True),
                                job("third", data)]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "[jobs] first: done already, skipped" in proc.stdout and "broken failed" in proc.stdout
    assert not (tmp_path / "broken.done").exists() and not (tmp_path / "third.log").exists()
    assert "missing.json" in (tmp_path / "broken.log").read_text()


@pytest.mark.slow
def test_jobs_batch_under_torchrun_owns_one_process_group_for_all_its_jobs(tmp_path, run):
    """Under torchrun, every job of a batch finds the batch's gloo group already up (world size 2), so no job
    creates and destroys its own: a job's fresh rendezvous right after another job's teardown could read the dead
    group's addresses from the launcher's store ("Connection refused", seen when a resumed benchmark batch began
    with a scoring job)."""
    (tmp_path / "probe_group.py").write_text(
        "import os\nimport torch.distributed as dist\n"
        "up = dist.is_initialized()\n"
        "print(f'rank={os.environ[\"RANK\"]} up={up} world={dist.get_world_size() if up else 0}', flush=True)\n")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"name": n, "module": "probe_group", "args": [], "log": str(tmp_path / f"{n}.log"),
                                 "done": str(tmp_path / f"{n}.done")} for n in ("first", "second")]))
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    run("--jobs", [str(jobs)], nproc=2, env={"PYTHONPATH": pythonpath})  # torchrun, its group killed on timeout
    for name in ("first", "second"):
        lines = sorted(line for line in (tmp_path / f"{name}.log").read_text().splitlines() if line.startswith("rank="))
        assert lines == ["rank=0 up=True world=2", "rank=1 up=True world=2"], (name, lines)

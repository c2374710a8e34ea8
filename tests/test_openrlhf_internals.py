"""The upgrade checklist, checked against the installed OpenRLHF: every hook our trainers override or call still
has its name and leading arguments, the private attributes we read are still set where we read them from, and the
touch-point helpers do what their docstrings say."""

import importlib
import inspect
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sepo import openrlhf_internals as internals


@pytest.mark.parametrize("module, path, params, user", internals.HOOKS, ids=[h[1] for h in internals.HOOKS])
def test_hook_still_has_its_name_and_arguments(module, path, params, user):
    obj = importlib.import_module(module)
    for name in path.split("."):
        obj = getattr(obj, name)
    names = tuple(inspect.signature(obj).parameters)
    assert names[: len(params)] == params, f"{path} (used by {user}) now takes {names}"


@pytest.mark.parametrize("module, cls", [("openrlhf.trainer.dpo_trainer", "DPOTrainer"),
                                         ("openrlhf.trainer.rm_trainer", "RewardModelTrainer"),
                                         ("openrlhf.trainer.sft_trainer", "SFTTrainer")])
def test_trainers_still_keep_their_loggers_where_we_read_them(module, cls):
    source = inspect.getsource(getattr(importlib.import_module(module), cls).__init__)
    assert "self._wandb = wandb" in source and "self._tensorboard = SummaryWriter" in source
    fit = inspect.getsource(getattr(importlib.import_module(module), cls).fit)
    assert fit.index("step_bar.set_postfix(logs_dict)") < fit.index("self.save_logs_and_checkpoints(")


def test_sft_dataset_still_reads_the_lists_we_write():
    # (RewardDataset's ids are made by dpo_texts / dpo_ids, compared with RewardDataset's own in test_row_ids.py.)
    from openrlhf.datasets import SFTDataset

    source = inspect.getsource(SFTDataset.__getitem__) + inspect.getsource(SFTDataset.get_loss_mask)
    assert all(f"self.{name}[idx]" in source for name in ("prompts", "responses", "prompt_ids_lens"))


def test_uneven_all_gather_concatenates_uneven_sizes_and_restores_the_method():
    class Strategy:
        """Rank 0 of two; rank 1 holds [4.0]. OpenRLHF's contract: equal sizes, concatenated in rank order."""

        def all_gather(self, data):
            other = torch.tensor([1.0]) if data.numel() == 1 and data.item() == 3.0 else torch.tensor([4.0, 0.0, 0.0])
            assert len(other) == len(data)
            return torch.cat([data, other])

    strategy = Strategy()
    method = strategy.all_gather
    with internals.uneven_all_gather(strategy):
        assert strategy.all_gather(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert "all_gather" not in vars(strategy) and strategy.all_gather.__func__ is method.__func__


def test_add_missing_flags_fills_only_what_is_missing_unless_told():
    group = SimpleNamespace(ipo_enable=True)
    internals.add_missing_flags(group, internals.DPO_LOSS_FLAGS)
    assert vars(group) == {"ipo_enable": True, "label_smoothing": 0.0}
    ds = SimpleNamespace(packing_samples=True)
    internals.add_missing_flags(ds, internals.NO_PACKING_FLAGS, overwrite=True)
    assert vars(ds) == internals.NO_PACKING_FLAGS


def test_log_eval_metrics_goes_to_wandb_else_tensorboard_on_rank_0_only():
    logged = []
    wandb = SimpleNamespace(log=logged.append)
    board = SimpleNamespace(add_scalar=lambda *a: logged.append(a))
    rank0 = SimpleNamespace(is_rank_0=lambda: True)
    internals.log_eval_metrics(SimpleNamespace(strategy=rank0, _wandb=wandb, _tensorboard=board), {"tau": 0.5}, 3)
    internals.log_eval_metrics(SimpleNamespace(strategy=rank0, _wandb=None, _tensorboard=board), {"tau": 0.5}, 3)
    other = SimpleNamespace(is_rank_0=lambda: False)
    internals.log_eval_metrics(SimpleNamespace(strategy=other, _wandb=wandb, _tensorboard=board), {"tau": 0.5}, 3)
    assert logged == [{"eval/tau": 0.5, "eval/global_step": 3}, ("eval/tau", 0.5, 3)]


@pytest.mark.parametrize("path", sorted(internals.LISTED_ELSEWHERE))
def test_touch_points_listed_elsewhere_are_where_the_checklist_says(path, vllm_importable):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            break
        except ModuleNotFoundError:
            continue
    for name in parts[cut:]:
        obj = getattr(obj, name)
    assert callable(obj)


# --- OpenRLHF's Ray PPO (train_ppo_dense) --------------------------------------------------------------------------

@pytest.fixture
def vllm_importable():
    """``import vllm`` works: the real one, else the stand-in (as train_ppo_dense arranges); the vllm modules
    registered before the test are restored after it."""
    import sys

    from openrlhf_sepo import vllm_standin

    saved = {n: m for n, m in sys.modules.items() if n == "vllm" or n.startswith("vllm.")}
    vllm_standin.install_if_missing()
    yield
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.mark.parametrize("module, path, params, user", internals.PPO_HOOKS, ids=[h[1] for h in internals.PPO_HOOKS])
def test_ppo_hook_still_has_its_name_and_arguments(vllm_importable, module, path, params, user):
    test_hook_still_has_its_name_and_arguments(module, path, params, user)


def _train_ppo_ray_source():
    import ast
    import importlib.util

    with open(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin) as f:
        text = f.read()
    tree = ast.parse(text)
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    main = next(n for n in tree.body if isinstance(n, ast.If))  # if __name__ == "__main__":
    return ast.get_source_segment(text, train), ast.get_source_segment(text, main)


def test_train_ppo_ray_still_calls_what_train_ppo_dense_hooks():
    train, main = _train_ppo_ray_source()
    # ppo_trainer_class: PPOTrainer imported at call time, on the synchronous path, then built with .remote
    assert "from openrlhf.trainer.ppo_trainer import PPOTrainer\n" in train and "PPOTrainer.remote(" in train
    # ray_init_with: its own ray.init, only when Ray is not running
    assert train.index("if not ray.is_initialized():") < train.index("ray.init(") < train.index("get_strategy(args)")
    # extra_flags_on_first_parse: one parser, parsed once, then hierarchized
    assert main.count("argparse.ArgumentParser(") == 1 and main.count(".parse_args(") == 1
    assert main.index("parser.parse_args()") < main.index("hierarchize(args)") < main.index("train(args)")


def test_the_vllm_standin_has_every_vllm_name_openrlhf_uses(vllm_importable):
    import importlib.util
    import re
    import sys

    from openrlhf_sepo import vllm_standin

    if not vllm_standin.is_standin(sys.modules["vllm"]):
        pytest.skip("a real vllm is installed")
    engine = vllm_standin.AsyncLLMEngine.__new__(vllm_standin.AsyncLLMEngine)
    engine.output_processor = vllm_standin._OutputProcessor()
    for module in ("openrlhf.trainer.ray.vllm_engine", "openrlhf.trainer.ppo_utils.samples_generator",
                   "openrlhf.utils.distributed_util", "openrlhf.trainer.ray.ppo_actor"):
        with open(importlib.util.find_spec(module).origin) as f:
            text = f.read()
        for name in re.findall(r"\bself\.llm\.(\w+)", text):
            assert hasattr(engine, name), f"{module} calls self.llm.{name}"
        for name in re.findall(r"(?<![\w.])vllm\.(\w+)", text):
            assert hasattr(sys.modules["vllm"], name), f"{module} uses vllm.{name}"
        for package, names in re.findall(r"from (vllm[\w.]*) import ([\w, ]+)", text):
            for name in names.split(","):
                assert hasattr(importlib.import_module(package), name.strip()), f"{module}: {package}.{name}"
    with open(importlib.util.find_spec("openrlhf.trainer.ray.vllm_worker_wrap").origin) as f:
        rpcs = set(re.findall(r"^    def (\w+)\(", f.read(), flags=re.M))  # what collective_rpc reaches
    assert rpcs <= set(dir(vllm_standin._Worker)), rpcs - set(dir(vllm_standin._Worker))


def test_ray_actor_class_is_the_decorated_class():
    import ray

    class Plain:
        pass

    assert internals.ray_actor_class(ray.remote(Plain)) is Plain


def test_ppo_trainer_class_swaps_for_the_block_only(vllm_importable):
    from openrlhf.trainer import ppo_trainer

    original, stand_in = ppo_trainer.PPOTrainer, object()
    with internals.ppo_trainer_class(stand_in):
        from openrlhf.trainer.ppo_trainer import PPOTrainer

        assert PPOTrainer is stand_in
    assert ppo_trainer.PPOTrainer is original


def test_extra_flags_on_first_parse_only():
    import argparse

    seen = []
    parser = argparse.ArgumentParser()
    parser.add_argument("--actor.lr", type=float, default=1.0)
    with internals.extra_flags_on_first_parse(lambda add: add("--dense.source", required=True), seen.append):
        args = parser.parse_args(["--dense.source", "none", "--actor.lr", "2"])
        again = argparse.ArgumentParser().parse_args([])  # a later parse is argparse's own
    assert vars(args) == {"actor.lr": 2.0, "dense.source": "none"} and seen == [args] and vars(again) == {}
    assert argparse.ArgumentParser.parse_args.__qualname__ == "ArgumentParser.parse_args"


def test_ray_init_with_updates_the_kwargs_for_the_block_only(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    recorder = ray.init
    with internals.ray_init_with(lambda kw: {**kw, "num_gpus": 7}):
        ray.init(runtime_env={"env_vars": {"A": "1"}})
    assert ray.init is recorder and calls == [{"runtime_env": {"env_vars": {"A": "1"}}, "num_gpus": 7}]


@pytest.fixture
def restored_cuda_patches(monkeypatch):
    """The process-wide patches of patch_torch_cuda_for_cpu_worker, undone after the test."""
    from openrlhf.trainer.ppo_utils import replay_buffer

    for name in internals.WORKER_CUDA_CALLS:
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))
    monkeypatch.setattr(torch.cuda, internals._PATCHED_FLAG, False, raising=False)
    monkeypatch.setattr(replay_buffer.NaiveReplayBuffer, "__init__", replay_buffer.NaiveReplayBuffer.__init__)
    return replay_buffer.NaiveReplayBuffer


def test_cpu_worker_patches_give_cuda_calls_a_cpu_meaning(restored_cuda_patches):
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # what OpenRLHF's actors would hit
    assert internals.patch_torch_cuda_for_cpu_worker() and internals.patch_torch_cuda_for_cpu_worker()  # idempotent
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.set_device(0), torch.cuda.synchronize()
    assert torch.cuda.current_stream() is None
    assert restored_cuda_patches(sample_batch_size=2).target_device == torch.device("cpu")


def test_cpu_worker_patches_touch_nothing_on_a_cuda_machine(restored_cuda_patches, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = {name: getattr(torch.cuda, name) for name in internals.WORKER_CUDA_CALLS}
    init = restored_cuda_patches.__init__
    assert internals.patch_torch_cuda_for_cpu_worker() is False
    assert {name: getattr(torch.cuda, name) for name in internals.WORKER_CUDA_CALLS} == before
    assert restored_cuda_patches.__init__ is init

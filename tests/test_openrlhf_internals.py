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
def test_touch_points_listed_elsewhere_are_where_the_checklist_says(path):
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

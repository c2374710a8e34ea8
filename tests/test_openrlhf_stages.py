"""OpenRLHF's own SFT and DPO entrypoints, unchanged, through the CPU runtime: 2 gloo ranks, ZeRO-2,
bf16 (SePO steps 1 and 2: the reference and the oracle), and one process without a launcher."""

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def max_weight_change(path_a, path_b):
    a, b = load_file(os.path.join(path_a, "model.safetensors")), load_file(os.path.join(path_b, "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_loads_with_transformers(path, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 20, 30, 40]])
    logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def sft_model(tiny_dir, run, tiny_flags, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    run("openrlhf.cli.train_sft", [
        "--model.model_name_or_path", os.path.join(tiny_dir, "base"),
        "--data.dataset", os.path.join(tiny_dir, "sft.jsonl"),
        "--data.input_key", "messages", "--data.apply_chat_template",
        *tiny_flags,
        "--train.max_epochs", "1", "--adam.lr", "1e-3",
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        "--ckpt.output_dir", os.path.join(out, "model"), "--ckpt.path", os.path.join(out, "ckpt"),
    ], nproc=2)
    return os.path.join(out, "model")


@pytest.mark.slow
def test_sft_then_dpo_two_ranks_zero2(tiny_dir, sft_model, run, tiny_flags, tb_scalars, tmp_path):
    assert_loads_with_transformers(sft_model, tiny_dir)
    assert max_weight_change(os.path.join(tiny_dir, "base"), sft_model) > 1e-3

    tb = str(tmp_path / "tb")
    oracle = str(tmp_path / "oracle")
    run("openrlhf.cli.train_dpo", [
        "--model.model_name_or_path", sft_model, "--ref.model_name_or_path", sft_model,
        "--data.dataset", os.path.join(tiny_dir, "pairs.jsonl"), "--data.apply_chat_template",
        *tiny_flags,
        "--train.max_epochs", "2", "--adam.lr", "1e-3", "--model.beta", "0.1",
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        "--logger.tensorboard_dir", tb,
        "--ckpt.output_dir", oracle, "--ckpt.path", str(tmp_path / "ckpt"),
    ], nproc=2)

    losses = [v for _, v in tb_scalars(tb)["train/loss"]]
    assert len(losses) == 2 * 48 // 8  # 2 epochs of 48 pairs, global batch 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert_loads_with_transformers(oracle, tiny_dir)
    assert max_weight_change(sft_model, oracle) > 1e-3


@pytest.mark.slow
def test_dpo_single_process_without_launcher(tiny_dir, run, tiny_flags, tb_scalars, tmp_path):
    base = os.path.join(tiny_dir, "base")
    tb = str(tmp_path / "tb")
    run("openrlhf.cli.train_dpo", [
        "--model.model_name_or_path", base,
        "--data.dataset", os.path.join(tiny_dir, "pairs_plain.jsonl"), "--data.prompt_key", "prompt",
        *tiny_flags,
        "--train.max_epochs", "2", "--adam.lr", "2e-3",
        "--ds.zero_stage", "0", "--ds.param_dtype", "bf16",
        "--logger.tensorboard_dir", tb,
        "--ckpt.output_dir", str(tmp_path / "dpo"), "--ckpt.path", str(tmp_path / "ckpt"),
    ], nproc=1)
    losses = [v for _, v in tb_scalars(tb)["train/loss"]]
    assert len(losses) == 12 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert_loads_with_transformers(str(tmp_path / "dpo"), tiny_dir)
    assert max_weight_change(base, str(tmp_path / "dpo")) > 1e-3

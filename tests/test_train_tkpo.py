"""train_tkpo (tkpo_data.py, tkpo_trainer.py, cli/train_tkpo.py): counterfactual rows and their skips, alignment by
response offset, the actor's two forwards, and train_tkpo end to end on 2 gloo ranks with resume and on 1 rank."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sepo import tiny
from openrlhf_sepo.tkpo_trainer import aligned_positions

TINY = ["--data.max_len", "128", "--train.micro_batch_size", "4", "--train.batch_size", "8", "--adam.lr", "1e-3",
        "--ds.attn_implementation", "sdpa", "--data.apply_chat_template"]
SWAP = json.dumps(tiny.STYLE_SWAP)


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory):
    """A style tokenizer, a tiny base model on it, 48 style SFT rows."""
    out = tmp_path_factory.mktemp("style")
    tiny.build_style_tokenizer(str(out / "tokenizer"))
    tiny.build_model(str(out / "base"), str(out / "tokenizer"))
    tiny.write_style_sft_data(str(out / "rows.jsonl"), 48, seed=3)
    return out


def counterfactual_dataset(rows, style_dir, **kwargs):
    import datasets
    from openrlhf.utils import get_tokenizer

    from openrlhf_sepo.datasets import DataStrategy
    from openrlhf_sepo.tkpo_data import CounterfactualSFTDataset

    data = SimpleNamespace(input_key="prompt", output_key="response", input_template=None, apply_chat_template=True,
                           tokenizer_chat_template=None)
    tokenizer = get_tokenizer(str(style_dir / "tokenizer"), None, "right", None)
    return CounterfactualSFTDataset(datasets.Dataset.from_list(rows), tokenizer, 128, DataStrategy(data, quiet=True),
                                    **kwargs)


def test_rows_pair_the_prompt_with_its_swapped_style_and_share_the_response_ids(style_dir):
    rows = tiny.make_style_rows(6, seed=1)
    ds = counterfactual_dataset(rows, style_dir, attribute_key="style", swap_map=tiny.STYLE_SWAP)
    assert len(ds) == 6 and not ds.skipped
    tok = ds.tokenizer
    for row, (ids, att, mask, cf_ids, cf_att) in zip(rows, ds.items):
        n = int(mask.sum())  # response tokens (the loss mask marks each one's predecessor)
        assert torch.equal(ids[0, -n:], cf_ids[0, -n:])
        prompt, cf_prompt = tok.decode(ids[0, :-n]), tok.decode(cf_ids[0, :-n])
        other = tiny.STYLE_SWAP[row["style"]]
        assert f"in a {row['style']} style" in prompt and f"in a {other} style" in cf_prompt
    inputs, attention, loss_mask = ds.collate_fn(ds.items[:3])
    assert inputs.shape[:2] == (3, 2) and attention.shape == inputs.shape and loss_mask.shape == (3, 1, inputs.shape[2])
    # the counterfactual may also come from a column
    with_column = [{**r, "cf": tiny.swap_style(r["prompt"], r["style"])} for r in rows]
    same = counterfactual_dataset(with_column, style_dir, counterfactual_key="cf")
    assert all(torch.equal(a[3], b[3]) for a, b in zip(ds.items, same.items))


@pytest.mark.parametrize("change,reason", [
    (lambda r: {**r, "style": "gothic"}, "attribute_not_in_swap_map"),
    (lambda r: {**r, "prompt": "Write a short note about the river."}, "attribute_not_in_prompt"),
    (lambda r: {**r, "response": "   "}, "empty_response"),
    (lambda r: {**r, "response": None}, "missing_key"),
])
def test_bad_rows_are_counted_skips_naming_the_row(style_dir, change, reason):
    rows = tiny.make_style_rows(3, seed=2)
    rows[1] = change(rows[1])
    ds = counterfactual_dataset(rows, style_dir, attribute_key="style", swap_map={**tiny.STYLE_SWAP})
    assert len(ds) == 2 and ds.skipped == {reason: 1} and ds.skip_examples[reason][0].startswith("row 1:")


def test_identical_counterfactual_is_skipped_and_no_row_is_an_error(style_dir):
    from openrlhf_sepo.tkpo_data import CounterfactualDataError

    rows = [{**r, "cf": r["prompt"]} for r in tiny.make_style_rows(2, seed=2)]
    with pytest.raises(CounterfactualDataError, match=r"no usable row.*identical_counterfactual"):
        counterfactual_dataset(rows, style_dir, counterfactual_key="cf")
    with pytest.raises(CounterfactualDataError, match="columns \\['cf'\\] not found"):
        counterfactual_dataset(tiny.make_style_rows(2, seed=2), style_dir, counterfactual_key="cf")


def test_aligned_positions_follow_the_response_offset():
    # row 0: prompt 3 tokens, response 4 (length 7); its counterfactual prompt has 5 tokens (length 9)
    # row 1: prompt 4, response 2 (length 6); counterfactual prompt 2 (length 4)
    attention = torch.tensor([[1] * 7 + [0] * 2, [1] * 6 + [0] * 3])
    cf_attention = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    loss_mask = torch.zeros(2, 8)
    loss_mask[0, 2:6] = 1  # positions 2..5 predict tokens 3..6
    loss_mask[1, 3:5] = 1
    policy, cf, valid = aligned_positions(loss_mask, attention, cf_attention)
    assert policy[0].tolist() == [2, 3, 4, 5] and cf[0].tolist() == [4, 5, 6, 7]
    assert policy[1, :2].tolist() == [3, 4] and cf[1, :2].tolist() == [1, 2]
    assert valid.tolist() == [[True] * 4, [True, True, False, False]]


def test_actor_runs_the_counterfactual_without_gradient(style_dir):
    from openrlhf_sepo.tkpo_trainer import TKPOActor

    ds = counterfactual_dataset(tiny.make_style_rows(3, seed=4), style_dir, attribute_key="style",
                                swap_map=tiny.STYLE_SWAP)
    inputs, attention, _ = ds.collate_fn(ds.items)
    actor = TKPOActor(str(style_dir / "base"), attn_implementation="sdpa", param_dtype="bf16").float()
    logps = actor(inputs, attention_mask=attention, return_logprobs=True)
    plain = actor(inputs[:, 0], attention_mask=attention[:, 0], return_logprobs=True)
    assert torch.allclose(logps, plain)
    logits, cf_logits, ids, att, cf_att = actor.counterfactual
    assert logits.requires_grad and not cf_logits.requires_grad and torch.equal(ids, inputs[:, 0])
    cf_plain = actor(inputs[:, 1], attention_mask=attention[:, 1], return_output=True)["logits"]
    assert torch.allclose(cf_logits, cf_plain, atol=1e-5)


@pytest.fixture(scope="module")
def trained(style_dir, run, tmp_path_factory):
    """train_tkpo on 2 gloo ranks: 48 rows, batch 8 -> 6 steps, a checkpoint every 2, eval every 3, TensorBoard."""
    work = tmp_path_factory.mktemp("tkpo")
    paths = SimpleNamespace(out=str(work / "out"), ckpt=str(work / "ckpt"), tb=str(work / "tb"))
    proc = run("openrlhf_sepo.cli.train_tkpo", [
        "--model.model_name_or_path", str(style_dir / "base"), "--data.dataset", str(style_dir / "rows.jsonl"),
        "--eval.dataset", str(style_dir / "rows.jsonl"), "--data.input_key", "prompt", "--data.output_key",
        "response", "--tkpo.attribute_key", "style", "--tkpo.swap_map", SWAP, "--tkpo.num_negatives", "5", *TINY,
        "--train.max_epochs", "1", "--eval.steps", "3", "--ckpt.output_dir", paths.out, "--ckpt.path", paths.ckpt,
        "--ckpt.save_steps", "2", "--logger.tensorboard_dir", paths.tb], nproc=2)
    paths.log = proc.stdout
    return paths


@pytest.mark.slow
def test_two_rank_run_logs_every_tkpo_metric_and_saves_a_loadable_model(trained, tb_scalars):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(trained.out)
    logs = tb_scalars(trained.tb)
    for metric in ("gpt_loss", "ce_loss", "tkpo_loss", "r_mean", "gold_rank", "lr", "grad_norm"):
        values = logs[f"train/{metric}"]
        assert [s for s, _ in values] == [1, 2, 3, 4, 5, 6], metric
        assert all(math.isfinite(v) for _, v in values), metric
    assert all(0 < v <= 1 for _, v in logs["train/r_mean"]) and all(0 <= v <= 5 for _, v in logs["train/gold_rank"])
    # the total is CE + 0.5 * L_TKPO on the same micro-batch (OpenRLHF scales gpt_loss by its step normaliser,
    # so compare the TKPO part: it is positive and the CE falls)
    ce = [v for _, v in logs["train/ce_loss"]]
    assert ce[-1] < ce[0]
    assert [s for s, _ in logs["eval/eval gpt_loss"]] == [3, 6]
    # and on the console: the progress bar shows them next to OpenRLHF's gpt_loss
    for metric in ("gpt_loss", "ce_loss", "tkpo_loss", "r_mean", "gold_rank"):
        assert f"{metric}=" in trained.log, metric


@pytest.mark.slow
def test_resume_continues_at_the_right_step(style_dir, trained, run, tb_scalars, tmp_path):
    assert os.path.isdir(os.path.join(trained.ckpt, "global_step4"))
    with open(os.path.join(trained.ckpt, "latest"), "w") as f:
        f.write("global_step4")
    tb = str(tmp_path / "tb")
    proc = run("openrlhf_sepo.cli.train_tkpo", [
        "--model.model_name_or_path", str(style_dir / "base"), "--data.dataset", str(style_dir / "rows.jsonl"),
        "--data.input_key", "prompt", "--data.output_key", "response", "--tkpo.attribute_key", "style",
        "--tkpo.swap_map", SWAP, "--tkpo.num_negatives", "5", *TINY, "--train.max_epochs", "1",
        "--ckpt.path", trained.ckpt, "--ckpt.load_enable", "--ckpt.output_dir", str(tmp_path / "out"),
        "--logger.tensorboard_dir", tb], nproc=2)
    assert "consumed_samples: 32" in proc.stdout
    assert [s for s, _ in tb_scalars(tb)["train/tkpo_loss"]] == [5, 6]


@pytest.mark.slow
def test_one_rank_with_a_counterfactual_column_and_gradient_through_negatives(style_dir, run, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{**r, "cf": tiny.swap_style(r["prompt"], r["style"])} for r in tiny.make_style_rows(16, seed=5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run("openrlhf_sepo.cli.train_tkpo", [
        "--model.model_name_or_path", str(style_dir / "base"), "--data.dataset", str(path), "--data.input_key",
        "prompt", "--data.output_key", "response", "--tkpo.counterfactual_key", "cf", "--tkpo.negatives_grad",
        "--tkpo.aggregation", "mean_log", *TINY, "--ds.zero_stage", "0", "--ckpt.output_dir", str(tmp_path / "out")])
    assert "CounterfactualSFTDataset (--data.dataset): 16 of 16 rows kept" in proc.stdout


def test_bad_data_stops_before_the_model_loads(style_dir, tmp_path, capsys, no_model_loads):
    """In this process, with model loaders that raise (conftest's no_model_loads)."""
    from openrlhf_sepo.cli import train_tkpo

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**r, "style": "gothic"}) + "\n" for r in tiny.make_style_rows(4, seed=6)))
    assert train_tkpo.main([
        "--model.model_name_or_path", str(style_dir / "base"), "--data.dataset", str(path), "--data.input_key",
        "prompt", "--data.output_key", "response", "--tkpo.attribute_key", "style", "--tkpo.swap_map", SWAP,
        *TINY]) == 1
    assert ("train_tkpo: error: --data.dataset: no usable row (skipped by reason: "
            "{'attribute_not_in_swap_map': 4})") in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--tkpo.attribute_key", "style", "--tkpo.swap_map", SWAP], "--data.output_key is required"),
    (["--data.output_key", "r"], "give either --tkpo.counterfactual_key or --tkpo.attribute_key"),
    (["--data.output_key", "r", "--tkpo.attribute_key", "style"], "--tkpo.attribute_key needs --tkpo.swap_map"),
    (["--data.output_key", "r", "--tkpo.attribute_key", "style", "--tkpo.swap_map", "{bad"], "--tkpo.swap_map: neither"),
    (["--data.output_key", "r", "--tkpo.counterfactual_key", "c", "--tkpo.lambda", "-1"], "--tkpo.lambda must be >= 0"),
    (["--data.output_key", "r", "--tkpo.counterfactual_key", "c", "--tkpo.tau", "0"], "--tkpo.tau must be > 0"),
    (["--data.output_key", "r", "--tkpo.counterfactual_key", "c", "--tkpo.aggregation", "sum"], "invalid choice"),
])
def test_bad_flags_are_refused(capsys, flags, message):
    from openrlhf_sepo.cli import train_tkpo

    with pytest.raises(SystemExit) as exit_info:
        train_tkpo.parse_args(["--model.model_name_or_path", "m", "--data.dataset", "d", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_parser_keeps_train_sft_names_and_defaults_and_the_released_tkpo_values():
    from openrlhf_sepo.cli import train_tkpo

    defaults = {a.dest: a.default for a in train_tkpo.build_parser()._actions}
    for dest, value in {"train.micro_batch_size": 8, "train.batch_size": 128, "adam.lr": 5e-6, "train.max_epochs": 2,
                        "data.max_len": 2048, "data.input_key": "input", "data.output_key": None,
                        "data.input_template": "User: {}\nAssistant: ", "tkpo.num_negatives": 20, "tkpo.tau": 0.15,
                        "tkpo.lam": 0.5, "tkpo.negatives_grad": False, "tkpo.aggregation": "log_mean"}.items():
        assert defaults[dest] == value, dest


def test_committed_benchmark_settings_cover_every_method_from_the_grid():
    from openrlhf_sepo.cli.tkpo_benchmark import METHODS, SETTINGS_FILE, grid_points

    with open(SETTINGS_FILE) as f:
        doc = json.load(f)
    assert set(doc["settings"]) == set(METHODS)
    for method, setting in doc["settings"].items():
        assert setting in grid_points(method), (method, setting)
        assert len(doc["validation"][method]) == len(grid_points(method))


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    """The TKPO benchmark's whole pipeline at its reduced sizes: start SFT, sft_more / tkpo / dpo on 2 seeds,
    evaluation, report; a rerun skips every finished stage."""
    import subprocess
    import sys

    out = str(tmp_path / "tkpo")
    cmd = [sys.executable, "-m", "openrlhf_sepo.cli.tkpo_benchmark", "--output_dir", out, "--quick"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("adherence", "format_validity", "kl_to_start", "win_rate_vs_start"):
        assert set(metrics[key]) == {"start", "sft_more", "tkpo", "dpo"}, key
        assert all(math.isfinite(v) for v in metrics[key].values())
        assert all(len(v) == 2 for v in metrics["per_seed"][key].values())
    assert metrics["kl_to_start"]["start"] == 0.0
    assert {"tkpo - sft_more", "tkpo - dpo"} <= set(metrics["adherence_differences"])
    assert "| tkpo |" in open(os.path.join(out, "report.md")).read()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0 and "policies   0 of 6 jobs to run" in rerun.stdout
